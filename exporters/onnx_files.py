"""ONNX files from a folder, read as hostile input (the ORT serving backend's task files).

:func:`read_onnx_file` opens only regular files (a FIFO or a device is refused at once, never
read), bounds the size, parses the graph without its external data, and checks that every
external-data reference names a regular file inside the graph's own folder and a byte range
within it. One sentence, naming the file, for anything else.
"""

from __future__ import annotations

import os

from liedeploy.errors import AdapterFileError
from liedeploy.io.safetensors_header import open_regular

__all__ = ["read_onnx_file", "MAX_ONNX_BYTES"]

MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit for one message


def read_onnx_file(path: str, max_bytes: int = MAX_ONNX_BYTES):
    """The ``onnx.ModelProto`` of ``path`` (external data not loaded), checked; AdapterFileError if unusable."""
    import onnx

    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise AdapterFileError(f"{path}: {size} bytes, over the {max_bytes}-byte bound of an ONNX graph")
        data = f.read(max_bytes + 1)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise AdapterFileError(f"{path}: not an ONNX model (its bytes do not parse as one)") from None
    if not proto.graph.node and not proto.graph.output:
        raise AdapterFileError(f"{path}: not an ONNX model (it holds no graph)")
    folder = os.path.dirname(os.path.abspath(path))
    for t in proto.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if not info:
            continue
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or os.path.normpath(loc).startswith("..") or os.sep in os.path.normpath(loc):
            raise AdapterFileError(f"{path}: initializer {t.name} keeps its data in {loc!r}, outside the graph's folder")
        target = os.path.join(folder, loc)
        try:
            with open_regular(target) as g:
                avail = os.fstat(g.fileno()).st_size
        except AdapterFileError as exc:
            raise AdapterFileError(f"{path}: initializer {t.name}: its data file is unusable ({exc})") from None
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"])
        except (KeyError, ValueError):
            raise AdapterFileError(f"{path}: initializer {t.name} has no valid external data length") from None
        if offset < 0 or length < 0 or offset + length > avail:
            raise AdapterFileError(f"{path}: initializer {t.name} reads bytes {offset}..{offset + length} of {loc}, "
                                   f"which holds {avail}")
    return proto
