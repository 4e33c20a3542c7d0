"""Which tasks a bank knows, from their adapter files, registered lazily.

Registering reads only the file's header (and checks it against the base: targets, shapes and
``base_sha256``), so a thousand registered tasks cost about nothing until used; the factors are
read when a task is first folded (:meth:`TaskEntry.adapter`), and checked to be the file that
was registered.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Mapping, Optional, Union

from liedeploy.core.adapter_file import AdapterFile, check_against_base, read_adapter
from liedeploy.io.adapter_header import AdapterHeader, parse_adapter_header
from liedeploy.errors import AdapterFileError, LieError
from liedeploy.io.safetensors_header import SafetensorsFile

__all__ = ["TaskEntry", "TaskRegistry", "check_full_tensors"]


def _full_specs(adapter) -> dict:
    """``{P: (shape, safetensors dtype)}`` of an adapter's full tensors (header or tensors)."""
    from liedeploy.io.dtypes import torch_to_st

    out = {}
    for P, v in adapter.full.items():
        if isinstance(v, dict):
            out[P] = (tuple(v["shape"]), v["dtype"])
        else:
            out[P] = (tuple(v.shape), torch_to_st(v.dtype))
    return out


def check_full_tensors(path: str, full: Mapping[str, tuple], shapes: Mapping[str, tuple],
                       dtypes: Optional[Mapping[str, str]], modules: set) -> None:
    """Refuse, at registration, full tensors (format "2") the base's modules cannot use.

    For a module whose weight has rank >= 2 (Linear, Conv, Embedding), a task may change the first
    axis (a head with another number of classes): the weight keeps every other axis, and the bias,
    replaced or not, has as many entries as the weight has rows. Any other replaced tensor (a norm's
    weight, bias or statistics) keeps the base's shape exactly. Every replaced tensor has the base's
    dtype. A tensor the base lacks must belong to a module of the base.
    """
    by_module: dict = {}
    for P in full:
        mod, _, attr = P.rpartition(".")
        by_module.setdefault(mod, {})[attr] = P
    for mod, attrs in sorted(by_module.items()):
        wname = f"{mod}.weight" if mod else "weight"
        base_w = tuple(shapes[wname]) if wname in shapes else None
        rows = None
        if base_w is not None and len(base_w) >= 2:
            new_w = tuple(full[wname][0]) if wname in full else base_w
            if len(new_w) != len(base_w) or new_w[1:] != base_w[1:]:
                raise AdapterFileError(f"{path}: full tensor {wname} has shape {list(new_w)} but the base's module takes "
                                       f"{list(base_w)} (only the first axis, the number of outputs, may differ)")
            rows = new_w[0]
        for attr, P in sorted(attrs.items()):
            shape, dtype = tuple(full[P][0]), full[P][1]
            if P not in shapes:
                if mod not in modules:
                    raise AdapterFileError(f"{path}: full tensor {P} belongs to no module of the base ({mod!r})")
                continue
            base = tuple(shapes[P])
            if rows is not None and P != wname and len(base) == 1:
                if shape != (rows,):
                    raise AdapterFileError(f"{path}: full tensor {P} has shape {list(shape)} but its module has {rows} "
                                           f"outputs")
            elif rows is None and shape != base:
                raise AdapterFileError(f"{path}: full tensor {P} has shape {list(shape)} but the base's module takes "
                                       f"{list(base)}")
            if dtypes is not None and P in dtypes and dtypes[P] != dtype:
                raise AdapterFileError(f"{path}: full tensor {P} is {dtype} but the base's is {dtypes[P]}")
        bias = f"{mod}.bias" if mod else "bias"
        if rows is not None and bias in shapes and bias not in full and tuple(shapes[bias]) != (rows,):
            raise AdapterFileError(f"{path}: full tensor {wname} has {rows} outputs but the base's {bias} has "
                                   f"{shapes[bias][0]}; replace the bias too")


class TaskEntry:
    """One registered task: its file, its validated header, its factors once read."""

    __slots__ = ("name", "path", "header", "identity", "verified", "_adapter", "_lock")

    def __init__(self, name: str, path: str, header: Union[AdapterHeader, AdapterFile], adapter: Optional[AdapterFile],
                 identity: Optional[tuple] = None):
        self.name, self.path, self.header, self._adapter = name, path, header, adapter
        self.identity = identity  # the registered file's (device, inode, size, mtime): a replaced file is refused
        self.verified = False  # its values were checked finite once (at this identity)
        self._lock = threading.Lock()

    def adapter(self) -> AdapterFile:
        """The task's factors (and full tensors): given at registration, or read from its file now.

        A lazily registered task's factors are read at each fold and not kept: memory for a
        thousand tasks stays their headers, whatever was folded before.
        """
        if self._adapter is not None:
            return self._adapter
        with self._lock:
            af = read_adapter(self.path, identity=self.identity, verified=self.verified and self.identity is not None,
                              file_hash=False)
            self.verified = True
        if af.base_sha256 != self.header.base_sha256 or af.targets != self.header.targets or set(af.full) != set(self.header.full):
            raise AdapterFileError(f"{self.path}: the file changed since the task {self.name!r} was registered; reload it")
        return af

    @property
    def targets(self) -> dict:
        return self.header.targets

    @property
    def full(self) -> dict:
        """The tensors the task replaces whole, by name (header entries, or tensors when given read)."""
        return self.header.full


class TaskRegistry:
    """``{task name: TaskEntry}`` checked against one base.

    Args:
        shapes: ``{state_dict name: shape}`` of the base.
        sha256: ``name -> hex digest`` of a base tensor (cached by the caller), or None to skip.
        dtypes: ``{state_dict name: safetensors dtype}`` of the base, to check full tensors' dtypes.
    """

    def __init__(self, shapes: Mapping[str, tuple], sha256: Optional[Callable[[str], str]] = None,
                 dtypes: Optional[Mapping[str, str]] = None):
        self.shapes = dict(shapes)
        self.sha256 = sha256
        self.dtypes = dict(dtypes) if dtypes is not None else None
        self._modules = {k.rpartition(".")[0] for k in self.shapes}
        self._entries: dict = {}
        self._lock = threading.RLock()

    def read(self, name: str, source: Union[str, AdapterFile], *, lazy: bool = True) -> TaskEntry:
        """Validate ``source`` against the base and return its entry (not yet registered)."""
        if isinstance(source, AdapterFile):
            self._check(source)
            return TaskEntry(name, source.path, source, source)
        path = os.fspath(source)
        if lazy:
            with SafetensorsFile(path) as f:
                header = parse_adapter_header(path, f.header, f.metadata)
                identity = f.identity
            self._check(header)
            return TaskEntry(name, path, header, None, identity)
        af = read_adapter(path)
        self._check(af)
        return TaskEntry(name, path, af, af)

    def _check(self, adapter) -> None:
        check_against_base(adapter, self.shapes, self.sha256)
        check_full_tensors(adapter.path, _full_specs(adapter), self.shapes, self.dtypes, self._modules)

    def put(self, entry: TaskEntry, *, replace: bool = False) -> Optional[TaskEntry]:
        """Register ``entry``; returns the entry it replaced (``replace=True``), if any."""
        with self._lock:
            old = self._entries.get(entry.name)
            if old is not None and not replace:
                raise LieError(f"task {entry.name!r} is already in the bank; pass replace=True to reload it")
            self._entries[entry.name] = entry
            return old

    def get(self, name: str) -> TaskEntry:
        entry = self._entries.get(name)
        if entry is None:
            known = sorted(self._entries)
            shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
            raise LieError(f"unknown task {name!r}; known tasks: {shown or 'none'}")
        return entry

    def pop(self, name: str) -> TaskEntry:
        with self._lock:
            entry = self.get(name)
            del self._entries[name]
            return entry

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list:
        return list(self._entries)
