"""A switchable multi-task ONNX model ("bank graph") plus one ``.onnx_adapter`` per task.

Base weights stay initializers; each adapted weight is computed in the graph as
W * exp(reshape(B @ A)), where ``P.lie_B`` (m, r) and ``P.lie_A`` (r, n) are graph inputs whose
defaults are zero-rank initializers: with no adapter active the graph is exactly the base model.
Each task is an ONNX Runtime adapter file (``AdapterFormat``) holding its factors, the scale folded
into B, activated per run with ``RunOptions.add_active_adapter``. Tasks may have different ranks:
the rank axis is dynamic. Only exact-map adapters can be served this way (first-order ones are
refused: merge them instead).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from liedeploy.core.adapter_file import AdapterFile, check_against_base, load_adapter, read_adapter
from liedeploy.io.atomic import Staging, safe_file_name
from liedeploy.errors import ConfigError, ExportError, LieError
from liedeploy.core.merge import merge_
from liedeploy.io.safetensors_io import atomic_path, tensor_sha256

from liedeploy.exporters.onnx import DEFAULT_OPSET, DEFAULT_TOLERANCE, quiet_export, require_onnx, verify_onnx

__all__ = ["export_bank_graph", "write_onnx_adapter", "BankSession", "bank_manifest"]

MANIFEST_SUFFIX = ".bank.json"


class _BankModule(nn.Module):
    """base(x) with every target weight replaced by W * exp(reshape(B @ A)) from extra inputs."""

    def __init__(self, model: nn.Module, targets: Sequence[str]):
        super().__init__()
        self.model = model
        self.targets = list(targets)

    def forward(self, x, *factors):
        params = {}
        for i, name in enumerate(self.targets):
            W = self.model.get_parameter(name)
            d = torch.matmul(factors[2 * i], factors[2 * i + 1]).reshape(W.shape)
            params[name] = W * torch.exp(d)
        return torch.func.functional_call(self.model, params, (x,))


def _graph_id(targets: dict) -> int:
    """A 31-bit id of the graph's adapter interface, stored as the adapters' model version."""
    text = json.dumps({k: list(v) for k, v in sorted(targets.items())})
    return int(hashlib.sha256(text.encode()).hexdigest()[:7], 16)


def bank_manifest(path: str) -> dict:
    """The sidecar manifest of a bank graph (targets, shapes, graph id, base hashes)."""
    mpath = path + MANIFEST_SUFFIX
    try:
        with open(mpath) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LieError(f"{path}: not a liedeploy bank graph ({mpath} is missing)") from None


def write_onnx_adapter(adapter: AdapterFile, manifest: dict, path: str) -> str:
    """Write ``adapter`` as an ONNX Runtime adapter file for the bank graph described by ``manifest``."""
    ort = require_onnx("onnxruntime")
    if adapter.expmap != "exact":
        raise LieError(f"{adapter.path}: the bank graph computes W * exp(dW); a first_order adapter must be merged instead")
    targets = manifest["targets"]
    extra = sorted(set(adapter.targets) - set(targets))
    if extra:
        raise LieError(f"{adapter.path}: target {extra[0]} is not adapted in the bank graph")
    params = {}
    for P, shape in targets.items():
        m, n = shape[0], int(np.prod(shape[1:]))
        if P in adapter.factors:
            if tuple(adapter.targets[P]["shape"]) != tuple(shape):
                raise LieError(f"{adapter.path}: target {P} has shape {list(adapter.targets[P]['shape'])}, the bank graph {shape}")
            B, A = adapter.factors[P]
            B = (B.double() * adapter.targets[P]["scale"]).float().numpy()
            A = A.float().numpy()
        else:  # not adapted by this task: rank 0
            B, A = np.zeros((m, 0), np.float32), np.zeros((0, n), np.float32)
        params[f"{P}.lie_B"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(B))
        params[f"{P}.lie_A"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(A))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(int(manifest["graph_id"]))
    fmt.set_parameters(params)
    with atomic_path(path) as tmp:
        fmt.export_adapter(tmp)
    return path


def _read_bank_adapters(adapters, base: nn.Module, sd: dict, verify_base: bool) -> list:
    """The adapters, read and checked: exact map, Lie targets only, made for this base, parameters."""
    afs = [read_adapter(a) for a in adapters]
    for af in afs:
        if af.full:
            raise ConfigError(
                f"{af.path}: the task replaces {sorted(af.full)[0]} whole (a head of its own), and a bank graph shares "
                "one set of weights between tasks: export it with --task-models instead"
            )
        check_against_base(af, {k: tuple(v.shape) for k, v in sd.items()},
                           (lambda P: tensor_sha256(sd[P])) if verify_base else None)
        if af.expmap != "exact":
            raise LieError(f"{af.path}: the bank graph computes W * exp(dW); a first_order adapter must be merged instead")
        for P in af.targets:
            try:
                base.get_parameter(P)
            except AttributeError:
                raise LieError(f"target {P} is a buffer, not a parameter: the bank graph adapts parameters only") from None
    return afs


def _factor_inputs(targets: dict, names: list, dynamic_batch: bool) -> tuple[list, tuple, list]:
    """``(example factors, dynamic shapes, input names)``: per target a B and an A input of free rank."""
    factors, dyn, r_ex = [], [], 2
    batch = torch.export.Dim("batch", min=1, max=4096) if dynamic_batch else None
    for i, P in enumerate(names):
        m, n = targets[P][0], int(np.prod(targets[P][1:]))
        factors += [torch.zeros(m, r_ex), torch.zeros(r_ex, n)]
        r = torch.export.Dim(f"rank_{i}", min=1, max=65536)
        dyn += [{1: r}, {0: r}]
    dynamic_shapes = ({0: batch} if batch is not None else None, tuple(dyn))  # forward(x, *factors)
    return factors, dynamic_shapes, ["input"] + [f"{P}.lie_{x}" for P in names for x in "BA"]


def _export_bank_module(wrapper: nn.Module, args: tuple, path: str, *, opset, input_names, dynamic_shapes) -> None:
    with torch.no_grad(), quiet_export():
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=int(opset), input_names=input_names,
            dynamic_shapes=dynamic_shapes, external_data=False, optimize=True,
        )
        program.save(path, external_data=False)


def _add_zero_rank_defaults(onnx, path: str, targets: dict, names: list, input_names: list) -> None:
    """Zero-rank initializers for every factor input: with no adapter active the graph is the base."""
    from onnx import numpy_helper

    proto = onnx.load(path)
    graph_inputs = {i.name for i in proto.graph.input}
    missing = [n for n in input_names[1:] if n not in graph_inputs]
    if missing:
        raise LieError(f"the exporter dropped factor input {missing[0]} from the bank graph")
    for P in names:
        m, n = targets[P][0], int(np.prod(targets[P][1:]))
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros((m, 0), np.float32), f"{P}.lie_B"))
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros((0, n), np.float32), f"{P}.lie_A"))
    onnx.save(proto, path)
    onnx.checker.check_model(path)


def export_bank_graph(
    model: nn.Module,
    example_inputs,
    path: str,
    adapters: Sequence[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    verify_base: bool = True,
) -> dict:
    """Export the bank graph of ``model`` for the targets of ``adapters`` and one ``.onnx_adapter`` each.

    Writes ``path`` (the graph), ``path + ".bank.json"`` (manifest), ``<adapter stem>.onnx_adapter``
    beside ``path`` for every adapter, and ``path + ".report.json"``. Checked in ONNX Runtime: no
    adapter gives the base model's output, each adapter gives its merged model's output.
    """
    onnx = require_onnx("onnx")
    require_onnx("onnxruntime")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    x = example_inputs[0]
    if not adapters:
        raise LieError("a bank graph needs at least one adapter file")
    base = copy.deepcopy(model).eval()
    sd = base.state_dict()
    afs = _read_bank_adapters(adapters, base, sd, verify_base)
    targets = {P: list(sd[P].shape) for af in afs for P in af.targets}
    names = sorted(targets)
    factors, dynamic_shapes, input_names = _factor_inputs(targets, names, dynamic_batch)
    stems = [safe_file_name(os.path.splitext(os.path.basename(a))[0], "adapter file name") for a in adapters]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"adapter file names must be unique (each gets its own .onnx_adapter), got {stems}")
    if len({af.name for af in afs}) != len(afs):
        raise ConfigError(f"task names must be unique, got {[af.name for af in afs]}")
    with Staging(path, inputs=list(adapters)) as stage:
        fname = stage.name
        tmp_dir = stage.dir
        tmp_path = stage.path(fname)
        _export_bank_module(_BankModule(base, names).eval(), (x, *factors), tmp_path, opset=opset,
                            input_names=input_names, dynamic_shapes=dynamic_shapes)
        _add_zero_rank_defaults(onnx, tmp_path, targets, names, input_names)
        manifest = {
            "format": "liedeploy.bank_graph", "format_version": "1", "targets": targets,
            "graph_id": _graph_id(targets), "base_sha256": {P: tensor_sha256(sd[P]) for P in names},
            "adapters": {},
        }
        with open(tmp_path + MANIFEST_SUFFIX, "w") as f:
            json.dump(manifest, f, indent=2)
        d_atol, d_rtol = DEFAULT_TOLERANCE["fp32"]
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
        session = BankSession(tmp_path)
        batches = (None, int(x.shape[0]) + 2) if dynamic_batch else (None,)
        report = {"ok": True, "atol": atol, "rtol": rtol, "tasks": {}}
        report["tasks"]["<base>"] = verify_onnx(tmp_path, base, example_inputs, batches=batches, atol=atol, rtol=rtol,
                                                session=session.session)
        for af, a_path, stem in zip(afs, adapters, stems):
            ad_path = os.path.join(tmp_dir, stem + ".onnx_adapter")
            write_onnx_adapter(af, manifest, ad_path)
            manifest["adapters"][af.name] = stem + ".onnx_adapter"
            merged = merge_(load_adapter(copy.deepcopy(model).eval(), a_path, verify_base=verify_base), keep_base=False)
            report["tasks"][af.name] = verify_onnx(
                tmp_path, merged, example_inputs, batches=batches, atol=atol, rtol=rtol,
                session=session.session, run_options=session.run_options(ad_path),
            )
        report["ok"] = all(t["ok"] for t in report["tasks"].values())
        if not report["ok"]:
            bad = next(k for k, t in report["tasks"].items() if not t["ok"])
            worst = max(o.get("max_abs", float("inf")) for c in report["tasks"][bad]["checks"] for o in c["outputs"])
            raise ExportError(f"the bank graph {fname} disagrees with torch for {bad}: max abs error {worst:.3g}; nothing was written")
        with open(tmp_path + MANIFEST_SUFFIX, "w") as f:
            json.dump(manifest, f, indent=2)
        report["onnx_bytes"] = os.path.getsize(tmp_path)
        with open(tmp_path + ".report.json", "w") as f:
            json.dump(report, f, indent=2)
        stage.publish_all(last=fname)
        return report


class BankSession:
    """An ONNX Runtime session over a bank graph, with adapters checked before they are activated.

    Example:
        >>> bank = BankSession("bank.onnx")
        >>> y = bank.run(x, adapter="rotated.onnx_adapter")   # adapter=None: the base model
    """

    def __init__(self, path: str, sess_options=None, providers: Sequence[str] = ("CPUExecutionProvider",)):
        ort = require_onnx("onnxruntime")
        self.path = path
        self.manifest = bank_manifest(path)
        if sess_options is None:
            sess_options = ort.SessionOptions()
            sess_options.log_severity_level = 3  # the factor inputs with defaults are intended
        self.session = ort.InferenceSession(path, sess_options=sess_options, providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name
        self._adapters: dict = {}

    def load_adapter(self, adapter_path: str):
        ort = require_onnx("onnxruntime")
        if adapter_path in self._adapters:
            return self._adapters[adapter_path]
        if not os.path.exists(adapter_path):
            raise LieError(f"{adapter_path}: no such file")
        fmt = ort.AdapterFormat.read_adapter(adapter_path)
        if fmt.get_model_version() != self.manifest["graph_id"]:
            raise LieError(f"{adapter_path}: made for another bank graph than {self.path} (model version "
                           f"{fmt.get_model_version()} vs {self.manifest['graph_id']})")
        for name, value in fmt.get_parameters().items():
            P, _, part = name.rpartition(".lie_")
            if P not in self.manifest["targets"]:
                raise LieError(f"{adapter_path}: parameter {name} is not an input of {self.path}")
        adapter = ort.LoraAdapter()
        adapter.Load(adapter_path)
        self._adapters[adapter_path] = adapter
        return adapter

    def run_options(self, adapter_path: Optional[str]):
        ort = require_onnx("onnxruntime")
        ro = ort.RunOptions()
        if adapter_path is not None:
            ro.add_active_adapter(self.load_adapter(adapter_path))
        return ro

    def run(self, x, adapter: Optional[str] = None):
        """Outputs for input ``x`` (numpy or torch) with ``adapter`` active (None: the base)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return self.session.run(None, {self.input_name: x}, run_options=self.run_options(adapter))
