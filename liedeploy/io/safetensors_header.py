"""Reading safetensors headers strictly, without torch, from one open file descriptor.

Nothing here ever unpickles: a file is an 8-byte length, a JSON header, then raw bytes. Every
check that safetensors itself makes is made here first (so a file accepted here is a file
safetensors can read, and an output built from it is too), and every refusal is one
:class:`AdapterFileError` sentence naming the file: never TypeError, RecursionError or OSError.

- Only regular files are opened (a FIFO, socket or device is refused at once, never waited on).
- A file is read through one descriptor: a file replaced by rename while it is read cannot mix
  the bytes of two files.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from liedeploy.io.dtypes import DTYPE_SIZES
from liedeploy.errors import AdapterFileError

__all__ = ["DTYPE_SIZES", "SafetensorsFile", "open_regular", "read_regular", "read_header", "read_index", "resolve_shards", "open_base_layout", "MAX_HEADER_BYTES",
           "MAX_NAME_CHARS"]

# safetensors dtype names -> bytes per element (the dtypes a weight file may hold)
MAX_HEADER_BYTES = 100 * 1024 * 1024
# the longest tensor name read: transformers' longest are ~150 characters; a bound keeps regex
# target matching (prune --targets, LieConfig targets) linear in the number of tensors
MAX_NAME_CHARS = 1024
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str):
    """Open ``path`` read-only as a binary file object, refusing anything but a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once (instead of waiting for a writer); the
    type is then checked on the descriptor itself (no race between a check and the open).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise AdapterFileError(f"{path}: is a directory, not a safetensors file") from None
    except PermissionError:
        raise AdapterFileError(f"{path}: permission denied") from None
    except OSError as exc:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            raise AdapterFileError(f"{path}: is {_kind(mode)}, not a regular file") from None
        raise AdapterFileError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterFileError(f"{path}: is {_kind(st.st_mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _sniff(head: bytes) -> str:
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "it is a pickle file; liedeploy never unpickles, save it with safetensors instead"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive such as a torch.save checkpoint; liedeploy never unpickles, save it with safetensors instead"
    if head[:6] == b"\x93NUMPY":
        return "it is a NumPy .npy file"
    if head[:1] in (b"{", b"["):
        return "it has no safetensors header"
    return "its first bytes are not a safetensors header"


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """A safetensors file opened once: ``header``, ``metadata``, ``data_start`` and ``file``.

    ``header`` maps tensor names to ``{"dtype", "shape", "data_offsets"}`` (offsets relative to
    ``data_start``). Use as a context manager; read tensor bytes with :meth:`read_into` or
    ``file`` at ``data_start + begin``.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.file = open_regular(self.path)
        try:
            self.size = os.fstat(self.file.fileno()).st_size
            self.header, self.metadata, self.data_start = self._parse()
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def _read_exact(self, offset: int, n: int) -> bytes:
        try:
            data = os.pread(self.file.fileno(), n, offset)
        except OSError as exc:
            raise AdapterFileError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
        return data

    @property
    def fd_path(self) -> str:
        """A path that opens this very file (``/proc/self/fd/N`` on Linux), for libraries that want a path."""
        p = f"/proc/self/fd/{self.file.fileno()}"
        return p if os.path.exists(p) else self.path

    @property
    def identity(self) -> tuple:
        """``(device, inode, size, mtime_ns)`` of the open file: tells a file replaced on disk."""
        st = os.fstat(self.file.fileno())
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def read_all(self) -> bytes:
        """The whole file, as bytes (for small files such as adapters)."""
        buf = bytearray(self.size)
        self.read_into(-self.data_start, buf)
        return bytes(buf)

    def read_into(self, offset: int, buf) -> int:
        """Read ``len(buf)`` bytes at ``data_start + offset`` into the writable buffer ``buf``."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.file.fileno(), [view[done:]], self.data_start + offset + done)
            except OSError as exc:
                raise AdapterFileError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
            if n <= 0:
                raise AdapterFileError(f"{self.path}: truncated while reading tensor data")
            done += n
        return done

    def _parse(self) -> tuple[dict, dict, int]:
        path, size = self.path, self.size
        head = self._read_exact(0, 8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: not a safetensors file ({_sniff(head) if head else 'it is empty'})")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            raise AdapterFileError(f"{path}: not a safetensors file ({_sniff(head)})")
        raw = self._read_exact(8, n)
        if len(raw) != n:
            raise AdapterFileError(f"{path}: truncated: its header is short of bytes")
        if raw[:1] != b"{":
            raise AdapterFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except RecursionError:
            raise AdapterFileError(f"{path}: not a safetensors file (its header nests too deeply)") from None
        except (UnicodeDecodeError, ValueError) as exc:
            why = str(exc) if str(exc).startswith("duplicate key") else "its header is not valid JSON"
            raise AdapterFileError(f"{path}: not a safetensors file ({why})") from None
        if not isinstance(header, dict):
            raise AdapterFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise AdapterFileError(f"{path}: not a safetensors file (its __metadata__ is not a map of strings to strings)")
        data_start = 8 + n
        avail = size - data_start
        spans = []
        for name, info in header.items():
            if len(name) > MAX_NAME_CHARS:
                raise AdapterFileError(f"{path}: has a tensor name of {len(name)} characters (at most {MAX_NAME_CHARS}: "
                                       f"{name[:40]!r}...)")
            spans.append(self._entry(name, info, avail))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                what = "overlaps another tensor" if begin < pos else "leaves a gap before it"
                raise AdapterFileError(f"{path}: tensor {name} has a byte range that {what} (offset {begin}, expected {pos})")
            pos = end
        if pos != avail:
            raise AdapterFileError(f"{path}: has {avail - pos} bytes after its last tensor (the header does not describe them)")
        return header, metadata, data_start

    def _entry(self, name: str, info, avail: int) -> tuple[int, int, str]:
        path = self.path
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise AdapterFileError(
                f"{path}: not a safetensors file (entry {name!r} must hold exactly dtype, shape and data_offsets)"
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise AdapterFileError(f"{path}: tensor {name} has dtype {dtype!r}, which liedeploy does not handle")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise AdapterFileError(f"{path}: tensor {name} has shape {shape!r}: a shape is a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or offsets[0] < 0 or offsets[1] < offsets[0]):
            raise AdapterFileError(
                f"{path}: tensor {name} has data_offsets {offsets!r}: they must be two integers 0 <= begin <= end"
            )
        numel = 1
        for s in shape:
            numel *= s
        begin, end = offsets
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise AdapterFileError(f"{path}: tensor {name} has a byte range that does not fit its shape {shape}")
        if end > avail:
            raise AdapterFileError(f"{path}: truncated: tensor {name} needs {end} data bytes but the file holds {avail}")
        return begin, end, name


def read_header(path: str) -> tuple[dict, dict, int]:
    """``(tensors, metadata, data_start)`` of a safetensors file, checked (see the module docs).

    Raises:
        AdapterFileError: missing or special file, not a safetensors file, malformed or truncated.
    """
    with SafetensorsFile(path) as f:
        return f.header, f.metadata, f.data_start


def open_base_layout(base: str, out: str) -> tuple:
    """``(index or None, {shard path: [names]})`` of a base file or sharded index; for a sharded base
    OUT must be an index path too (refused in one sentence otherwise)."""
    from liedeploy.errors import ConfigError

    if not base.endswith(".index.json"):
        return None, {base: None}
    if not out.endswith(".safetensors.index.json"):
        raise ConfigError(f"{base} is sharded: OUT must be a *.safetensors.index.json path, got {out}")
    return read_index(base)


def read_regular(path: str, limit: int, what: str = "file") -> bytes:
    """The bytes of a small regular file, at most ``limit`` of them.

    Refuses (one sentence naming ``path``) anything :func:`open_regular` refuses (FIFOs, devices,
    folders: never a hang, never an endless read) and a file longer than ``limit``.
    """
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise AdapterFileError(f"{path}: the {what} is larger than {limit} bytes")
    return data


def resolve_shards(path: str) -> dict:
    """``{shard_path: [tensor names]}`` for a ``*.safetensors.index.json`` (in shard order)."""
    return read_index(path)[1]


def read_index(path: str) -> tuple[dict, dict]:
    """``(index JSON, {shard_path: [tensor names]})`` of a ``*.safetensors.index.json``, read once.

    Refuses (one sentence naming the index): a shard path that leaves the index's folder
    (absolute, ``..``, a folder of its own) or two shards with the same file name.
    """
    try:
        with open_regular(path) as f:
            index = json.loads(f.read(64 * 1024 * 1024).decode("utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError
    except RecursionError:
        raise AdapterFileError(f"{path}: not a safetensors index (its JSON nests too deeply)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise AdapterFileError(f"{path}: not a safetensors index (needs a JSON object with a non-empty 'weight_map')") from None
    folder = os.path.dirname(os.path.abspath(path))
    shards: dict = {}
    names: dict = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise AdapterFileError(f"{path}: tensor {name!r} has shard {shard!r}, not a file name")
        norm = os.path.normpath(shard)
        if os.path.isabs(shard) or norm == os.pardir or norm.startswith(os.pardir + os.sep) or norm in (".", ""):
            raise AdapterFileError(
                f"{path}: shard {shard!r} of tensor {name} leaves the index's folder; shards must lie inside it"
            )
        full = os.path.join(folder, norm)
        other = names.setdefault(os.path.basename(norm), full)
        if other != full:
            raise AdapterFileError(
                f"{path}: two shards have the file name {os.path.basename(norm)!r} ({os.path.relpath(other, folder)} and "
                f"{norm}); shard file names must be unique"
            )
        shards.setdefault(full, []).append(name)
    return index, shards
