"""The serving backends, one module each: ``torch`` (the AdapterBank), ``ort`` (ONNX Runtime over an
export folder) and ``trt`` (a refittable TensorRT engine).

Importing this package registers their factories with :func:`liedeploy.serving.backend.register_backend`;
each factory imports its own stack (onnxruntime, tensorrt) only when that backend is built.
"""

from __future__ import annotations

from liedeploy.errors import ConfigError
from liedeploy.serving.backend import register_backend

__all__ = ["torch_backend", "ort_backend", "trt_backend"]


def torch_backend(cfg):
    """The AdapterBank over ``cfg.model`` (a factory or a transformers folder) and ``cfg.weights``."""
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device} was asked for but no CUDA device is visible")
    from liedeploy.serving.backends.torch import TorchBackend

    if cfg.hf_model:
        from liedeploy.files.model_loading import load_hf_model

        model, cfg.tokenizer_object = load_hf_model(cfg.hf_model, cfg.tokenizer)
    else:
        if not cfg.model or not cfg.weights:
            raise ConfigError("--backend torch needs --model PKG.MOD:FACTORY and --weights BASE.safetensors, or --hf-model DIR")
        from liedeploy.files.model_loading import build_model

        model = build_model(cfg.model, cfg.model_kwargs, cfg.weights)
    return TorchBackend(model, cfg.input_specs(), cache_bytes=cfg.cache_bytes, device=cfg.device, threads=cfg.threads,
                        cache_policy=cfg.cache_policy, max_batch=cfg.max_batch)


def ort_backend(cfg):
    """ONNX Runtime over the folder that ``liedeploy export --onnx --task-models/--bank`` wrote."""
    from liedeploy.serving.backends.ort import OrtBackend

    if not cfg.adapters:
        raise ConfigError("--backend ort needs --adapters DIR: the folder 'liedeploy export --onnx --task-models/--bank' wrote")
    return OrtBackend(cfg.adapters, threads=cfg.threads or 0)


def trt_backend(cfg):
    """A TensorRT engine built by ``liedeploy export --trt``, refitted per task."""
    from liedeploy.serving.backends.trt import TrtBackend

    return TrtBackend.from_config(cfg)


register_backend("torch", torch_backend)
register_backend("ort", ort_backend)
register_backend("trt", trt_backend)
