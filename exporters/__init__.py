"""Deployment exporters (ONNX Runtime, TensorRT). Depends on liedeploy; heavy imports inside functions."""

__all__: list[str] = []
