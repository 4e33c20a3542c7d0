"""Low-level safetensors helpers: header parsing with clear refusals, hashing, atomic writes.

Nothing here ever unpickles: files are read as a JSON header plus raw bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from typing import Iterator

import torch

from .errors import AdapterFileError

__all__ = [
    "read_header",
    "tensor_sha256",
    "atomic_path",
    "ST_DTYPES",
    "DTYPE_NAMES",
    "resolve_shards",
]

# safetensors dtype strings <-> torch dtypes (the ones a weight file may hold).
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


def _sniff(head: bytes) -> str:
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "it is a pickle file; liedeploy never unpickles, save it with safetensors instead"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive such as a torch.save checkpoint; liedeploy never unpickles, save it with safetensors instead"
    if head[:6] == b"\x93NUMPY":
        return "it is a NumPy .npy file"
    if head[:1] in (b"{", b"[") or head[:2] in (b"\x08\x00",):
        return "it has no safetensors header"
    return "its first bytes are not a safetensors header"


def read_header(path: str) -> tuple[dict, dict, int]:
    """Parse and check a safetensors header.

    Returns:
        ``(tensors, metadata, data_start)``: ``tensors`` maps names to
        ``{"dtype", "shape", "data_offsets"}`` (offsets relative to ``data_start``),
        ``metadata`` is the ``__metadata__`` dict (may be empty).

    Raises:
        AdapterFileError: missing file, not a safetensors file, or truncated data.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterFileError(f"{path}: not a safetensors file ({_sniff(head) if head else 'it is empty'})")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or n > size - 8:
                raise AdapterFileError(f"{path}: not a safetensors file ({_sniff(head)})")
            raw = f.read(n)
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise AdapterFileError(f"{path}: is a directory, not a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise AdapterFileError(f"{path}: not a safetensors file (its header is not valid JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: not a safetensors file (its __metadata__ is not a string map)")
    data_start = 8 + n
    avail = size - data_start
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for s in shape:
                numel *= int(s)
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(f"{path}: not a safetensors file (entry {name!r} is malformed)") from None
        if dtype not in ST_DTYPES:
            raise AdapterFileError(f"{path}: tensor {name} has dtype {dtype}, which liedeploy does not handle")
        if end - begin != numel * ST_DTYPES[dtype].itemsize or begin < 0:
            raise AdapterFileError(f"{path}: tensor {name} has a byte range that does not fit its shape {shape}")
        if end > avail:
            raise AdapterFileError(
                f"{path}: truncated: tensor {name} needs {end} data bytes but the file holds {avail}"
            )
    return header, metadata, data_start


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes as stored (row-major, its own dtype)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync and rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise AdapterFileError(f"{path}: the output folder {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600: give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def resolve_shards(path: str) -> dict:
    """``{shard_path: [tensor names]}`` for a ``*.safetensors.index.json`` (in shard order)."""
    try:
        with open(path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: no such file") from None
    except (ValueError, KeyError, TypeError):
        raise AdapterFileError(f"{path}: not a safetensors index (needs a JSON object with a 'weight_map')") from None
    folder = os.path.dirname(os.path.abspath(path))
    shards: dict = {}
    for name, shard in weight_map.items():
        shards.setdefault(os.path.join(folder, shard), []).append(name)
    return shards
