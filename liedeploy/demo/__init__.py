"""The demo (``liedeploy demo``), in one place: the torch track, the ONNX steps, the compressed track
and the HTTP serving step. The top layer beside the CLI."""

__all__: list[str] = []
