"""``OrtAdapterBank``: the AdapterBank API over ONNX Runtime.

Two export modes, chosen per task from measurements (benchmarks/bench_onnx.py, README):
- hot tasks: a merged per-task model (``export_task_models``) in its own InferenceSession. The
  initializers every task shares with the base are loaded once into OrtValues and handed to every
  session with ``SessionOptions.add_initializer``, so they are not read or held once per task
  (ONNX Runtime still keeps its own pre-packed copy of weights per session).
  Fastest: weights are constants (the ratio to the bank graph is in the README's measured table).
- long tail: one bank graph (``export_bank_graph``) whose ``.onnx_adapter`` per task is activated
  per run; memory per task = its factors, but every call recomputes W * exp(BA).
At most ``max_sessions`` hot sessions are kept (the most used, as the torch bank keeps its folded
tasks: :class:`~liedeploy.bank.task_cache.TaskCache`); other tasks run on the bank graph.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Optional, Sequence

import numpy as np

from liedeploy.bank.task_cache import TaskCache
from liedeploy.io.atomic import safe_file_name
from liedeploy.exporters.onnx_files import read_onnx_file
from liedeploy.errors import AdapterFileError, LieError

from liedeploy.exporters.onnx import require_onnx
from liedeploy.exporters.task_models import shared_initializers

__all__ = ["OrtAdapterBank"]


class OrtAdapterBank:
    """Serve tasks from ONNX Runtime with the same calls as :class:`liedeploy.AdapterBank`.

    Args:
        task_models: folder written by ``export_task_models`` (``base.onnx`` + ``<task>.onnx``), or None.
        bank_graph: path of a bank graph written by ``export_bank_graph``, or None.
        max_sessions: how many per-task sessions to keep (hot tasks); 0 = bank graph only.
        threads: intra-op threads per session.

    Example:
        >>> bank = OrtAdapterBank(task_models="tasks/", bank_graph="bank.onnx", max_sessions=4)
        >>> y = bank(x, task="rotated")
    """

    def __init__(self, task_models: Optional[str] = None, bank_graph: Optional[str] = None, *,
                 max_sessions: int = 8, threads: int = 0):
        ort = require_onnx("onnxruntime")
        if task_models is None and bank_graph is None:
            raise LieError("OrtAdapterBank needs task_models=FOLDER and/or bank_graph=PATH")
        self._ort = ort
        self.threads = threads
        self.max_sessions = max_sessions
        self._lock = threading.RLock()
        self._sessions: dict = {}  # task -> live session; which stay is the bank's task cache policy
        self._cache = TaskCache(max(max_sessions, 1))  # one unit per session
        self._task_files: dict = {}
        self._adapters: dict = {}
        self._shared_values: dict = {}
        self.stats = {"session_hits": 0, "sessions_built": 0, "bank_graph_calls": 0, "evictions": 0, "build_seconds": 0.0,
                      "not_kept": 0}
        self.refused: dict = {}  # task -> why its file cannot be served
        self._checked: dict = {}  # path -> (device, inode, size, mtime) when it was read and found usable
        if task_models is not None:
            if not os.path.exists(os.path.join(task_models, "base.onnx")):
                raise LieError(f"{task_models}: no base.onnx (write it with export_task_models / --task-models)")
            self._check(os.path.join(task_models, "base.onnx"))  # the base must be usable: refused otherwise
            for f in sorted(os.listdir(task_models)):
                if f.endswith(".onnx") and not f.startswith("."):
                    path = os.path.join(task_models, f)
                    try:
                        self._check(path)
                    except AdapterFileError as exc:  # one bad file: that task only
                        self.refused[f[: -len(".onnx")]] = str(exc)
                        continue
                    self._task_files[f[: -len(".onnx")]] = path
            self._load_shared(task_models)
        self.bank = None
        if bank_graph is not None:
            from liedeploy.exporters.bank_graph import BankSession

            self.bank = BankSession(bank_graph, self._options())
            folder = os.path.dirname(os.path.abspath(bank_graph))
            for task, fname in self.bank.manifest.get("adapters", {}).items():
                # a manifest is a file: its names are reduced to plain file names beside it
                self._adapters[task] = os.path.join(folder, safe_file_name(str(fname), "adapter file name"))

    def _check(self, path: str) -> None:
        """:func:`read_onnx_file`, once per version of a file (a path registered again unchanged is
        not read again)."""
        try:
            st = os.stat(path)
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            ident = None
        if ident is not None and self._checked.get(path) == ident:
            return
        read_onnx_file(path)
        if ident is not None:
            self._checked[path] = ident

    def _options(self):
        so = self._ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        return so

    def _load_shared(self, folder: str) -> None:
        """One OrtValue per initializer that base and every task model share (same bytes on disk)."""
        common = shared_initializers(list(self._task_files.values()))
        import onnx

        proto = onnx.load(self._task_files["base"], load_external_data=False)
        meta = {t.name: (list(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type)) for t in proto.graph.initializer}
        for name, (location, offset, length) in common.items():
            dims, dtype = meta[name]
            arr = np.fromfile(os.path.join(folder, location), dtype=np.uint8, count=length, offset=offset)
            arr = arr.view(dtype).reshape(dims)
            self._shared_values[name] = self._ort.OrtValue.ortvalue_from_numpy(arr)

    @property
    def tasks(self) -> list:
        return sorted((set(self._task_files) - {"base"}) | set(self._adapters))

    def add(self, name: str, onnx_adapter: str) -> None:
        """Add a long-tail task served by the bank graph (an ``.onnx_adapter`` for it)."""
        if self.bank is None:
            raise LieError("add needs a bank graph: construct OrtAdapterBank(bank_graph=...)")
        self.bank.load_adapter(onnx_adapter)  # refuses an adapter made for another graph
        with self._lock:
            self._adapters[name] = onnx_adapter

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self.tasks:
                raise LieError(f"unknown task {name!r}; known tasks: {', '.join(self.tasks) or 'none'}")
            self._adapters.pop(name, None)
            self._task_files.pop(name, None)
            self._drop_session(name)

    def _drop_session(self, name: str) -> None:
        self._sessions.pop(name, None)
        self._cache.pop(name)

    def _session(self, task: str):
        with self._lock:
            self._cache.record(task)
            sess = self._sessions.get(task)
            if sess is not None:
                self._cache.touch(task)
                self.stats["session_hits"] += 1
                return sess
        so = self._options()
        for name, value in self._shared_values.items():
            so.add_initializer(name, value)
        t0 = time.perf_counter()
        try:
            sess = self._ort.InferenceSession(self._task_files[task], so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT's own refusals: this task cannot be served
            why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise AdapterFileError(f"{self._task_files[task]}: ONNX Runtime cannot load it ({why})") from None
        with self._lock:
            self.stats["sessions_built"] += 1
            self.stats["build_seconds"] += time.perf_counter() - t0
            victims = self._cache.victims(task, 1)
            if victims is None:  # used less than every live session: served once, not kept
                self.stats["not_kept"] += 1
                return sess
            for old in victims:
                self._drop_session(old)
                self.stats["evictions"] += 1
            self._cache.put(task, 1)
            self._sessions[task] = sess
        return sess

    @property
    def hot_tasks(self) -> list:
        """Tasks with a live ONNX Runtime session, least recently used first."""
        with self._lock:
            return self._cache.keys()

    def add_task_model(self, name: str, path: str) -> None:
        """Add (or replace) a hot task served by its merged model (a ``<task>.onnx`` of the task-models folder).

        The file is checked first (:func:`~liedeploy.exporters.onnx_files.read_onnx_file`): a special
        file, a file that is not ONNX, or external data outside its folder is refused in one sentence.
        """
        self._check(path)
        with self._lock:
            self._task_files[name] = path
            self._drop_session(name)

    def is_hot(self, task: Optional[str]) -> bool:
        """Whether ``task`` runs without building a session (a live session, or the bank graph)."""
        key = "base" if task is None else task
        if key in self._sessions:
            return True
        return key not in self._task_files and self.bank is not None

    def _route(self, task: Optional[str]):
        """``(session, run_options)`` that compute ``task``."""
        key = "base" if task is None else task
        if key in self._task_files and (self.max_sessions > 0 or key == "base"):
            return self._session(key), None
        if self.bank is not None and (task is None or task in self._adapters):
            self.stats["bank_graph_calls"] += 1
            return self.bank.session, self.bank.run_options(None if task is None else self._adapters[task])
        raise LieError(f"unknown task {task!r}; known tasks: {', '.join(self.tasks) or 'none'}")

    def session_for(self, task: Optional[str]):
        """The ONNX Runtime session that computes ``task`` (for its input and output names)."""
        return self._route(task)[0]

    def run_feeds(self, task: Optional[str], feeds: dict) -> dict:
        """``{output name: array}`` for ``feeds`` ``{input name: array}`` with ``task`` (None: the base)."""
        sess, ro = self._route(task)
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, feeds, run_options=ro) if ro is not None else sess.run(names, feeds)
        return dict(zip(names, outs))

    def __call__(self, x, task: Optional[str] = None):
        """Outputs (first output) for ``x`` with ``task`` (None: the base)."""
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        key = "base" if task is None else task
        if key in self._task_files and (self.max_sessions > 0 or key == "base"):
            sess = self._session(key)
            return sess.run(None, {sess.get_inputs()[0].name: x})[0]
        if self.bank is not None and (task is None or task in self._adapters):
            self.stats["bank_graph_calls"] += 1
            return self.bank.run(x, adapter=None if task is None else self._adapters[task])[0]
        raise LieError(f"unknown task {task!r}; known tasks: {', '.join(self.tasks) or 'none'}")

    def forward_mixed(self, x, tasks: Sequence[Optional[str]]):
        """One task per sample: grouped by task, outputs returned in input order."""
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        from liedeploy.core.mixed import run_mixed

        return run_mixed(lambda t, xs: self(xs, task=t), tasks, len(x), lambda idx: x[idx])
