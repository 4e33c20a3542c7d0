"""TensorRT 10.12+ / 11.x: strongly typed engines, refit of only the adapted weights, task switches.

- Precision lives in the ONNX graph (TensorRT 11 removed weak typing): ``--fp16`` exports fp16
  weights and compute with fp32 inputs and outputs (:func:`exporters.onnx.export_onnx`), int8 comes
  from a QDQ graph. Networks are created strongly typed where the flag exists (10.12+); on 11.x
  every network is. Features are detected by name, never by version number or enum integer.
- ``export_refit_onnx``: an ONNX model (checked in ONNX Runtime) whose initializers are named as in
  ``state_dict()``, plus ``<model>.onnx.refit.json``: the weights a task can change (the targets of
  the given adapters and their same-shape full tensors; tied parameters map to one name) and their
  initializer (= TensorRT refit) names. Only those are marked refittable, so every other weight
  can be fused and folded by the builder.
- ``export_tensorrt``: ``REFIT_INDIVIDUAL`` + ``mark_weights_refittable`` for the manifest's weights;
  ``strip=True`` adds ``STRIP_PLAN`` (never ``REFIT_IDENTICAL``): the plan holds no refittable
  weights and is refitted at load from the base file (and an adapter).
- ``refit_weights`` / ``TrtTaskSwitcher``: each refit computed from the pristine base, so A, B, A
  gives exactly A; each weight cast to ``get_weights_prototype(name)``'s dtype;
  ``get_missing_weights()`` must be empty; no refit overlaps work enqueued on the engine.

This machine has neither TensorRT nor CUDA: graphs, manifests, refit arrays, the slot LRU and the
refusals are tested on CPU; building, refitting and running engines run in benchmarks/gpu_check.py.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from liedeploy.core.adapter_file import read_adapter
from liedeploy.core.algebra import fold
from liedeploy.io.atomic import atomic_path
from liedeploy.errors import ConfigError, ExportError, LieError, MissingDependencyError
from liedeploy.io.safetensors_io import BaseTensors

from liedeploy.exporters.onnx import DEFAULT_OPSET, require_onnx, export_onnx

__all__ = ["export_refit_onnx", "export_tensorrt", "refit_weights", "TrtTaskSwitcher", "require_tensorrt",
           "refittable_targets", "strip_size_report", "network_flags", "batch_profile", "check_serving_profile",
           "complete_missing", "tensorrt_version"]

MANIFEST_SUFFIX = ".refit.json"

def require_tensorrt():
    """Import TensorRT and check for a CUDA device, or refuse in one sentence saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(
            "TensorRT is not installed: pip install 'liedeploy[trt]' on a machine with an NVIDIA GPU, or export "
            "with --onnx --for-trt and build the engine with trtexec --onnx=MODEL.onnx --refit"
        ) from None
    if tensorrt_version(trt) < (10, 12):
        raise MissingDependencyError(
            f"TensorRT {getattr(trt, '__version__', '?')} is installed; liedeploy needs 10.12 or later (REFIT_INDIVIDUAL, "
            "strongly typed networks): pip install 'liedeploy[trt]'"
        )
    if not torch.cuda.is_available():
        raise LieError("TensorRT needs a CUDA device and none is visible (torch.cuda.is_available() is False)")
    return trt


def tensorrt_version(trt) -> tuple:
    """``(major, minor)`` of an imported TensorRT module (``(0, 0)`` when it does not say)."""
    parts = str(getattr(trt, "__version__", "0.0")).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network, by feature detection (10.12+: the flag; 11.x: default)."""
    flags = 0
    kinds = getattr(trt, "NetworkDefinitionCreationFlag", None)
    strongly = getattr(kinds, "STRONGLY_TYPED", None) if kinds is not None else None
    if strongly is not None:
        flags |= 1 << int(strongly)
    return flags


def refittable_targets(model: nn.Module, adapters: Sequence[str] = ()) -> list:
    """Parameter names a task can change: the adapters' targets and same-shape full tensors.

    With no adapters: every parameter of rank >= 2 (any of them could be an adapter target).
    A full tensor whose shape differs from the model's (a head with another number of classes) is
    refused: it cannot be refitted into this engine.
    """
    params = dict(model.named_parameters())
    if not adapters:
        return sorted(n for n, p in params.items() if p.dim() >= 2)
    out = set()
    for a in adapters:
        af = read_adapter(a)
        out |= set(af.targets)
        for P, t in af.full.items():
            if P not in params or tuple(params[P].shape) != tuple(t.shape):
                have = list(params[P].shape) if P in params else "no such tensor"
                raise LieError(f"{a}: replaces {P} with shape {list(t.shape)} (the engine's: {have}); a task whose head "
                               "changes a shape cannot be refitted into this engine: build an engine for that head")
            out.add(P)
    return sorted(out)


def export_refit_onnx(model: nn.Module, example_inputs, path: str, *, opset: int = DEFAULT_OPSET,
                      dynamic_batch: bool = False, fp16: bool = False, atol=None, rtol=None,
                      refit_adapters: Sequence[str] = ()) -> dict:
    """Export a refit-ready ONNX model and its manifest (``path + ".refit.json"``) of refittable weights."""
    onnx = require_onnx("onnx")
    model = model.eval()
    targets = refittable_targets(model, refit_adapters)

    def add_manifest(stage, staged_graph: str) -> dict:  # published with the graph, in one step
        manifest = _refit_manifest(onnx.load(staged_graph, load_external_data=False), model, targets, path, fp16)
        with open(stage.path(os.path.basename(path) + MANIFEST_SUFFIX), "w") as f:
            json.dump(manifest, f, indent=2)
        return {"refit_manifest": path + MANIFEST_SUFFIX}

    return export_onnx(model, example_inputs, path, opset=opset, dynamic_batch=dynamic_batch, fp16=fp16,
                       atol=atol, rtol=rtol, optimize=False, before_publish=add_manifest)


def _refit_manifest(proto, model: nn.Module, targets: Sequence[str], path: str, fp16: bool) -> dict:
    """The refit manifest of an exported graph: which initializer each refittable weight is."""
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    by_storage: dict = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        by_storage.setdefault(p.data_ptr(), []).append(name)
    wanted = set(targets)
    for name in list(wanted):  # a tied parameter is refitted under its one initializer name
        wanted |= set(by_storage.get(params[name].data_ptr(), [])) if name in params else set()
    weights = {}
    for name in sorted(wanted):
        p = params[name]
        holder = next((n for n in by_storage[p.data_ptr()] if n in inits), None)
        if holder is None or inits[holder] != list(p.shape):
            raise ExportError(f"parameter {name} is not an initializer of the exported graph: it cannot be refitted; "
                              "nothing was written")
        weights[name] = {"initializer": holder, "shape": list(p.shape), "tied": holder != name}
    return {"format": "liedeploy.refit_manifest", "format_version": "2", "onnx": os.path.basename(path),
            "dtype": "fp16" if fp16 else "fp32", "weights": weights,
            "refittable": sorted({w["initializer"] for w in weights.values()})}


def strip_size_report(onnx_path: str, manifest: dict) -> dict:
    """Bytes of weights a stripped plan leaves out, from the ONNX initializers (computable on CPU).

    ``kept_ratio``: weights still in a ``STRIP_PLAN`` engine whose refittable weights are the
    manifest's, over all weights; ``all_refittable_kept_ratio``: the same when every weight is marked
    refittable (the plan without weights).
    """
    onnx = require_onnx("onnx")
    from onnx import numpy_helper

    proto = onnx.load(onnx_path, load_external_data=True)
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in proto.graph.initializer}
    total = sum(sizes.values())
    stripped = sum(sizes.get(n, 0) for n in manifest.get("refittable", []))
    big = sum(v for v in sizes.values() if v >= 1024)
    return {"weights_bytes": total, "stripped_bytes": stripped, "kept_ratio": (total - stripped) / max(total, 1),
            "all_refittable_kept_ratio": (total - big) / max(total, 1)}


def refit_weights(base: str, adapter: Optional[str], manifest: dict, previous: Optional[set] = None,
                  dtype: Optional[torch.dtype] = None, prototypes: Optional[dict] = None) -> dict:
    """``{refit name: numpy array}`` that turn an engine into ``adapter``'s task.

    Every adapted weight is folded from the pristine base file; targets of ``previous`` (the last
    task's) that this adapter does not change get their base values back. Full tensors of the same
    shape are refitted as they are. ``prototypes``: ``{refit name: numpy dtype}`` from
    ``Refitter.get_weights_prototype`` (each array is cast to it); ``adapter`` None: the base.
    """
    get = BaseTensors(base).get
    weights = manifest["weights"]
    af = read_adapter(adapter) if adapter is not None else None
    targets = (set(af.targets) | set(af.full)) if af else set()
    out = {}
    dtype = dtype or (torch.float16 if manifest.get("dtype") == "fp16" else None)
    for P in sorted(targets | (previous or set())):
        if P not in weights:
            raise LieError(f"{adapter}: {P} is not a refittable weight of {manifest.get('onnx', 'the engine')}; "
                           "export the engine with this adapter among --refit-targets")
        W = get(P)
        if af is not None and P in af.targets:
            B, A = af.factors[P]
            if tuple(W.shape) != tuple(af.targets[P]["shape"]):
                raise LieError(f"{adapter}: target {P} has shape {list(af.targets[P]['shape'])}, the base {list(W.shape)}")
            W = fold(W, B, A, af.targets[P]["scale"], af.expmap)
        elif af is not None and P in af.full:
            if tuple(af.full[P].shape) != tuple(W.shape):
                raise LieError(f"{adapter}: replaces {P} with shape {list(af.full[P].shape)}; a task whose head changes "
                               "a shape cannot be refitted into this engine: build an engine for that head")
            W = af.full[P].to(W.dtype)
        if dtype is not None:
            W = W.to(dtype)
        arr = np.ascontiguousarray(W.float().numpy() if W.dtype == torch.bfloat16 else W.numpy())
        name = weights[P]["initializer"]
        if prototypes and name in prototypes:
            arr = np.ascontiguousarray(arr.astype(prototypes[name], copy=False))
        out[name] = arr
    return out


def batch_profile(example_batch: int, dynamic_batch: bool, max_batch: Optional[int], opt_batch: Optional[int]) -> tuple:
    """``(min, opt, max)`` batch sizes of the engine's optimization profile; ConfigError when they
    do not make sense. A fixed-batch engine (no ``--dynamic-batch``) has min = opt = max = the
    example's batch."""
    if not dynamic_batch:
        if max_batch is not None or opt_batch is not None:
            raise ConfigError("--max-batch and --opt-batch set the batch range of --dynamic-batch engines; add --dynamic-batch")
        return example_batch, example_batch, example_batch
    hi = 64 if max_batch is None else int(max_batch)
    opt = min(example_batch, hi) if opt_batch is None else int(opt_batch)
    if not 1 <= opt <= hi:
        raise ConfigError(f"--opt-batch must be between 1 and --max-batch ({hi}), got {opt}")
    return 1, opt, hi


def check_serving_profile(engine_path: str, inputs: dict, max_batch: int) -> None:
    """Refuse, in one sentence naming the export flag, an engine the server cannot feed batches.

    Args:
        inputs: ``{input name: (engine shape with -1 for dynamic axes, (min, opt, max) profile
            shapes or None)}``, as ``ICudaEngine.get_tensor_shape`` and
            ``get_tensor_profile_shape(name, 0)`` give them.
        max_batch: ``liedeploy serve --max-batch``.
    """
    for name, (shape, profile) in inputs.items():
        if not shape or shape[0] != -1:
            raise ConfigError(
                f"{engine_path}: input {name} has a fixed batch of {shape[0] if shape else 1}, and the server batches "
                f"up to {max_batch} samples: build it with 'liedeploy export --trt --dynamic-batch --max-batch {max_batch}'"
            )
        top = profile[2][0] if profile else None
        if top is not None and top < max_batch:
            raise ConfigError(
                f"{engine_path}: its profile takes at most {top} samples of {name} and --max-batch is {max_batch}: build "
                f"it with 'liedeploy export --trt --dynamic-batch --max-batch {max_batch}' or serve with --max-batch {top}"
            )


def complete_missing(missing: Sequence[str], manifest: dict) -> tuple[set, list]:
    """TensorRT's two-step refit: the weights ``Refitter.get_missing_weights()`` still asks for.

    Returns ``(state_dict names to supply, names no manifest entry provides)``. Every refittable
    weight is in the manifest, so the first set is computed (from the base and the task) and
    supplied; only the second is refused.
    """
    by_init: dict = {}
    for P, w in manifest["weights"].items():
        by_init.setdefault(w["initializer"], P)
    supply, unknown = set(), []
    for name in missing:
        if name in by_init:
            supply.add(by_init[name])
        else:
            unknown.append(name)
    return supply, unknown


def export_tensorrt(model: nn.Module, example_inputs, path: str, *, opset: int = DEFAULT_OPSET,
                    dynamic_batch: bool = False, fp16: bool = False, max_batch: Optional[int] = None,
                    opt_batch: Optional[int] = None, workspace_bytes: int = 4 << 30, strip: bool = False,
                    refit_adapters: Sequence[str] = (), tf32: bool = True,
                    optimization_level: Optional[int] = None) -> dict:
    """Build a strongly typed engine at ``path`` with only the adapted weights refittable.

    Writes the refit-ready ONNX and its manifest beside it. ``strip``: a weight-stripped plan
    (``STRIP_PLAN`` with ``REFIT_INDIVIDUAL``) to refit at load from the base file.
    """
    trt = require_tensorrt()  # refuse before writing anything
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    lo, opt, hi = batch_profile(int(example_inputs[0].shape[0]), dynamic_batch, max_batch, opt_batch)
    onnx_path = os.path.splitext(path)[0] + ".onnx"
    report = export_refit_onnx(model, example_inputs, onnx_path, opset=opset, dynamic_batch=dynamic_batch, fp16=fp16,
                               refit_adapters=refit_adapters)
    with open(onnx_path + MANIFEST_SUFFIX) as f:
        manifest = json.load(f)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser refused {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):  # fp32 math in fp32: exact comparisons with torch
        config.clear_flag(trt.BuilderFlag.TF32)
    if optimization_level is not None:  # 0-5: lower builds faster (TensorRT's default is 3)
        config.builder_optimization_level = int(optimization_level)
    if strip:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    for name in manifest["refittable"]:
        if not network.mark_weights_refittable(name):
            raise ExportError(f"TensorRT could not mark {name} refittable in {onnx_path}")
    if dynamic_batch:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            shape = list(example_inputs[i].shape)
            profile.set_shape(inp.name, [lo] + shape[1:], [opt] + shape[1:], [hi] + shape[1:])
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see the messages above)")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(plan)
    report.update({"engine": path, "engine_bytes": os.path.getsize(path), "stripped": bool(strip),
                   "refittable": len(manifest["refittable"]), "batch_profile": [lo, opt, hi]})
    return report


class TrtTaskSwitcher:
    """Switch a refittable engine between tasks, always from the pristine base weights.

    Refits never overlap work enqueued on the engine: :meth:`activate` synchronizes ``stream``
    (the stream the engine's work runs on) and holds :attr:`lock`, which runners also hold while
    they enqueue.

    Example:
        >>> sw = TrtTaskSwitcher("model.engine", base="base.safetensors")
        >>> sw.activate("rotated.safetensors"); ...; sw.activate(None)  # back to the base
    """

    def __init__(self, engine_path: str, base: str, manifest: Optional[str] = None, *, engine=None, stream=None):
        trt = require_tensorrt()
        manifest = manifest or os.path.splitext(engine_path)[0] + ".onnx" + MANIFEST_SUFFIX
        with open(manifest) as f:
            self.manifest = json.load(f)
        self.base = base
        self.logger = trt.Logger(trt.Logger.WARNING)
        if engine is None:
            with open(engine_path, "rb") as f:
                engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if engine is None:
            raise LieError(f"{engine_path}: TensorRT could not load this engine")
        if not engine.refittable:
            raise LieError(f"{engine_path}: the engine was built without REFIT_INDIVIDUAL: tasks cannot be refitted")
        self.engine = engine
        self.stream = stream
        self.lock = threading.Lock()
        self._trt = trt
        self._active_targets: set = set()
        self.active: Optional[str] = None
        self.stats = {"refits": 0, "missing_supplied": 0}  # missing: weights TensorRT asked for after the first set
        self._stripped = True  # a stripped plan needs every refittable weight once: refit the base first
        self.activate(None, full=True)

    def _prototypes(self, refitter) -> dict:
        trt = self._trt
        out = {}
        for name in self.manifest["refittable"]:
            proto = refitter.get_weights_prototype(name)
            out[name] = trt.nptype(proto.dtype)
        return out

    def activate(self, adapter: Optional[str], *, full: bool = False) -> None:
        """Refit the engine to ``adapter``'s task (None: the base); ``full`` refits every refittable weight."""
        trt = self._trt
        refitter = trt.Refitter(self.engine, self.logger)
        previous = set(self.manifest["weights"]) if full else self._active_targets
        weights = refit_weights(self.base, adapter, self.manifest, previous=previous,
                                prototypes=self._prototypes(refitter))
        keep = []  # trt.Weights reference host memory: keep the arrays alive until the refit ran
        for name, arr in weights.items():
            keep.append(arr)
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise LieError(f"TensorRT refused refit weights {name} (shape {list(arr.shape)}, dtype {arr.dtype})")
        missing = list(refitter.get_missing_weights())
        if missing:  # TensorRT's two-step protocol: supply what it still asks for, then ask again
            supply, unknown = complete_missing(missing, self.manifest)
            if unknown:
                raise LieError(f"TensorRT needs weights to refit that no manifest entry provides: {', '.join(unknown[:3])}")
            more = refit_weights(self.base, adapter, self.manifest, previous=supply | self._active_targets,
                                 prototypes=self._prototypes(refitter))
            self.stats["missing_supplied"] += len(missing)
            for name in missing:
                arr = more[name]
                keep.append(arr)
                if not refitter.set_named_weights(name, trt.Weights(arr)):
                    raise LieError(f"TensorRT refused refit weights {name} (shape {list(arr.shape)}, dtype {arr.dtype})")
            still = list(refitter.get_missing_weights())
            if still:
                raise LieError(f"TensorRT still needs weights to refit after they were supplied: {', '.join(still[:3])}")
        with self.lock:
            if self.stream is not None:
                self.stream.synchronize()  # never refit under work enqueued on this engine
            elif torch.cuda.is_available():
                torch.cuda.synchronize()
            if not refitter.refit_cuda_engine():
                raise LieError("TensorRT failed to refit the engine")
            self.stats["refits"] += 1
        af = read_adapter(adapter) if adapter else None
        self._active_targets = (set(af.targets) | set(af.full)) if af else set()
        self.active = adapter
