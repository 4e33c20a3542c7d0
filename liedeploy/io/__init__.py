"""I/O layer: safetensors headers and files, the adapter file format, dtype names and atomic publishing.

The lowest layer: imports nothing of liedeploy but the base modules (errors, version).
"""

__all__: list[str] = []
