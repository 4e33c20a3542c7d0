"""The demo (``liedeploy demo``): the torch track and the HTTP serving step. The steps that need the
ONNX stack (exports, ONNX Runtime scoring, the compressed track's int8 task models) live beside the
demo command in ``liedeploy.cli.demo_onnx`` and ``liedeploy.cli.demo_compress``, so nothing under
``liedeploy/`` but the CLI and the serving backends reaches for onnx or the exporters."""

__all__: list[str] = []
