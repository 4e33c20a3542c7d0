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

__all__ = ["TaskEntry", "TaskRegistry"]


class TaskEntry:
    """One registered task: its file, its validated header, its factors once read."""

    __slots__ = ("name", "path", "header", "_adapter", "_lock")

    def __init__(self, name: str, path: str, header: Union[AdapterHeader, AdapterFile], adapter: Optional[AdapterFile]):
        self.name, self.path, self.header, self._adapter = name, path, header, adapter
        self._lock = threading.Lock()


    def adapter(self) -> AdapterFile:
        """The task's factors (and full tensors): given at registration, or read from its file now.

        A lazily registered task's factors are read at each fold and not kept: memory for a
        thousand tasks stays their headers, whatever was folded before.
        """
        if self._adapter is not None:
            return self._adapter
        with self._lock:
            af = read_adapter(self.path)
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
    """

    def __init__(self, shapes: Mapping[str, tuple], sha256: Optional[Callable[[str], str]] = None):
        self.shapes = dict(shapes)
        self.sha256 = sha256
        self._entries: dict = {}
        self._lock = threading.RLock()

    def read(self, name: str, source: Union[str, AdapterFile], *, lazy: bool = True) -> TaskEntry:
        """Validate ``source`` against the base and return its entry (not yet registered)."""
        if isinstance(source, AdapterFile):
            check_against_base(source, self.shapes, self.sha256)
            return TaskEntry(name, source.path, source, source)
        path = os.fspath(source)
        if lazy:
            with SafetensorsFile(path) as f:
                header = parse_adapter_header(path, f.header, f.metadata)
            check_against_base(header, self.shapes, self.sha256)
            return TaskEntry(name, path, header, None)
        af = read_adapter(path)
        check_against_base(af, self.shapes, self.sha256)
        return TaskEntry(name, path, af, af)

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
