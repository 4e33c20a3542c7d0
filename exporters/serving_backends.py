"""Registers the ONNX Runtime and TensorRT serving backends (``--backend ort`` / ``--backend trt``).

Importing this module is what makes them available to :func:`liedeploy.serving.server.build_backend`;
the CLI imports it, the core never does (exporters depend on the core, not the reverse).
"""

from __future__ import annotations

from liedeploy.errors import ConfigError
from liedeploy.serving.backend import register_backend

__all__ = ["ort_backend", "trt_backend"]


def ort_backend(cfg):
    from .ort_serving import OrtBackend

    if not cfg.adapters:
        raise ConfigError("--backend ort needs --adapters DIR: the folder 'liedeploy export --onnx --task-models/--bank' wrote")
    return OrtBackend(cfg.adapters, threads=cfg.threads or 0)


def trt_backend(cfg):
    from .trt_serving import TrtBackend

    return TrtBackend.from_config(cfg)


register_backend("ort", ort_backend)
register_backend("trt", trt_backend)
