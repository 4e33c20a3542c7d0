"""TensorRT: refit-ready ONNX, refittable engines, and task switches by refit from the pristine base.

- ``export_refit_onnx``: an ONNX model (verified in ONNX Runtime) whose initializers are named as
  in ``state_dict()`` (the exporter's optimizer is off), plus ``<model>.onnx.refit.json``, the
  weight-name manifest: which ONNX initializer (= TensorRT refit name) holds each parameter, tied
  parameters included. ``trtexec --onnx=model.onnx --refit`` or ``export_tensorrt`` consume it.
- ``export_tensorrt``: builds a refittable engine (``BuilderFlag.REFIT``) with TensorRT's Python API.
- ``TrtTaskSwitcher``: switches tasks by refitting the adapted weights, each time computed from the
  pristine base file, never on top of already refitted weights (so A, B, A gives exactly A: the
  refit-blending trap of TensorRT users), and restores base values for targets the new task lacks.

This machine has neither TensorRT nor CUDA: the ONNX graph, the manifest, the refit weights and
the error messages are tested here; building and refitting engines was not run.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from liedeploy.adapter_file import read_adapter
from liedeploy.algebra import fold
from liedeploy.errors import LieError
from liedeploy.safetensors_io import atomic_path, read_header, resolve_shards

from .onnx import DEFAULT_OPSET, _require, export_onnx

__all__ = ["export_refit_onnx", "export_tensorrt", "refit_weights", "TrtTaskSwitcher", "require_tensorrt"]

MANIFEST_SUFFIX = ".refit.json"


def require_tensorrt():
    """Import TensorRT and check for a CUDA device, or refuse in one sentence saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise LieError(
            "TensorRT is not installed: pip install 'liedeploy[trt]' on a machine with an NVIDIA GPU, or export "
            "with --onnx --for-trt and build the engine with trtexec --onnx=MODEL.onnx --refit"
        ) from None
    if not torch.cuda.is_available():
        raise LieError("TensorRT needs a CUDA device and none is visible (torch.cuda.is_available() is False)")
    return trt


def export_refit_onnx(model: nn.Module, example_inputs, path: str, *, opset: int = DEFAULT_OPSET,
                      dynamic_batch: bool = False, fp16: bool = False, atol=None, rtol=None) -> dict:
    """Export a refit-ready ONNX model and its weight-name manifest (``path + ".refit.json"``)."""
    onnx = _require("onnx")
    model = model.eval()
    report = export_onnx(model, example_inputs, path, opset=opset, dynamic_batch=dynamic_batch, fp16=fp16,
                         atol=atol, rtol=rtol, optimize=False)
    proto = onnx.load(path, load_external_data=False)
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    by_storage: dict = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        by_storage.setdefault(p.data_ptr(), []).append(name)
    weights = {}
    for name, p in params.items():
        holder = next((n for n in by_storage[p.data_ptr()] if n in inits), None)
        if holder is None or inits[holder] != list(p.shape):
            for f in (path, path + ".report.json"):
                if os.path.exists(f):
                    os.unlink(f)
            raise LieError(f"parameter {name} is not an initializer of the exported graph: it cannot be refitted")
        weights[name] = {"initializer": holder, "shape": list(p.shape), "tied": holder != name}
    manifest = {"format": "liedeploy.refit_manifest", "format_version": "1", "onnx": os.path.basename(path),
                "dtype": "fp16" if fp16 else "fp32", "weights": weights}
    with atomic_path(path + MANIFEST_SUFFIX) as tmp:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
    report["refit_manifest"] = path + MANIFEST_SUFFIX
    return report


def _base_reader(base: str):
    shards = resolve_shards(base) if base.endswith(".index.json") else {base: None}
    index = {}
    for shard in shards:
        header, _, _ = read_header(shard)
        for k in header:
            index[k] = shard

    def get(name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in index:
            raise LieError(f"{base}: has no tensor {name}")
        with safe_open(index[name], framework="pt") as f:
            return f.get_tensor(name)

    return get


def refit_weights(base: str, adapter: Optional[str], manifest: dict, previous: Optional[set] = None,
                  dtype: Optional[torch.dtype] = None) -> dict:
    """``{refit name: numpy array}`` that turn an engine into ``adapter``'s task.

    Every adapted weight is folded from the pristine base file; targets of ``previous`` (the
    last task's targets) that this adapter does not adapt get their base values back. ``adapter``
    ``None``: the base model.
    """
    get = _base_reader(base)
    weights = manifest["weights"]
    af = read_adapter(adapter) if adapter is not None else None
    targets = set(af.targets) if af else set()
    out = {}
    dtype = dtype or (torch.float16 if manifest.get("dtype") == "fp16" else None)
    for P in sorted(targets | (previous or set())):
        if P not in weights:
            raise LieError(f"{adapter}: target {P} is not a refittable weight of {manifest.get('onnx', 'the engine')}")
        W = get(P)
        if af is not None and P in targets:
            B, A = af.factors[P]
            if tuple(W.shape) != tuple(af.targets[P]["shape"]):
                raise LieError(f"{adapter}: target {P} has shape {list(af.targets[P]['shape'])}, the base {list(W.shape)}")
            W = fold(W, B, A, af.targets[P]["scale"], af.expmap)
        if dtype is not None:
            W = W.to(dtype)
        out[weights[P]["initializer"]] = np.ascontiguousarray(W.float().numpy() if W.dtype == torch.bfloat16 else W.numpy())
    return out


def export_tensorrt(model: nn.Module, example_inputs, path: str, *, opset: int = DEFAULT_OPSET,
                    dynamic_batch: bool = False, fp16: bool = False, max_batch: int = 64,
                    workspace_bytes: int = 4 << 30) -> dict:
    """Build a refittable TensorRT engine at ``path`` (plus the refit-ready ONNX and manifest beside it)."""
    trt = require_tensorrt()  # refuse before writing anything
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    onnx_path = os.path.splitext(path)[0] + ".onnx"
    report = export_refit_onnx(model, example_inputs, onnx_path, opset=opset, dynamic_batch=dynamic_batch, fp16=fp16)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LieError(f"TensorRT's ONNX parser refused {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.set_flag(trt.BuilderFlag.REFIT)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if dynamic_batch:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            inp = network.get_input(i)
            shape = list(example_inputs[i].shape)
            profile.set_shape(inp.name, [1] + shape[1:], shape, [max_batch] + shape[1:])
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LieError(f"TensorRT could not build an engine from {onnx_path} (see the messages above)")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(plan)
    report["engine"] = path
    return report


class TrtTaskSwitcher:
    """Switch a refittable engine between tasks, always from the pristine base weights.

    Example:
        >>> sw = TrtTaskSwitcher("model.engine", base="base.safetensors")
        >>> sw.activate("rotated.safetensors"); ...; sw.activate(None)  # back to the base
    """

    def __init__(self, engine_path: str, base: str, manifest: Optional[str] = None):
        trt = require_tensorrt()
        manifest = manifest or os.path.splitext(engine_path)[0] + ".onnx" + MANIFEST_SUFFIX
        with open(manifest) as f:
            self.manifest = json.load(f)
        self.base = base
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise LieError(f"{engine_path}: TensorRT could not load this engine")
        if not self.engine.refittable:
            raise LieError(f"{engine_path}: the engine was built without BuilderFlag.REFIT")
        self._trt = trt
        self._active_targets: set = set()
        self.active: Optional[str] = None

    def activate(self, adapter: Optional[str]) -> None:
        trt = self._trt
        weights = refit_weights(self.base, adapter, self.manifest, previous=self._active_targets)
        refitter = trt.Refitter(self.engine, self.logger)
        for name, arr in weights.items():
            if not refitter.set_named_weights(name, trt.Weights(arr)):
                raise LieError(f"TensorRT refused refit weights {name} (shape {list(arr.shape)})")
        missing = refitter.get_missing_weights()
        if missing:
            raise LieError(f"TensorRT needs more weights to refit: {', '.join(missing[:3])}")
        if not refitter.refit_cuda_engine():
            raise LieError("TensorRT failed to refit the engine")
        self._active_targets = set(read_adapter(adapter).targets) if adapter else set()
        self.active = adapter
