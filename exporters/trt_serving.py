"""The serving backend over TensorRT engines (``liedeploy serve --backend trt``)."""

from __future__ import annotations

from .tensorrt import require_tensorrt

__all__ = ["TrtBackend"]


class TrtBackend:
    kind = "trt"

    @classmethod
    def from_config(cls, cfg):
        require_tensorrt()  # one sentence, exit 1, when TensorRT or CUDA is absent
        raise NotImplementedError
