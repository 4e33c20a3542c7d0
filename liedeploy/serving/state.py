"""The server's model repository: which tasks exist, which are unavailable and why, where a task's
file is. Used by ``liedeploy serve`` and by the Ray Serve ingress alike.

Task names are what a URL path and a file name can both hold: letters, digits, ``.``, ``_`` and
``-``, 1 to 128 characters, not starting with ``.`` (:data:`TASK_NAME`). A file in the adapters
folder whose stem is not such a name, or that cannot be used (a dangling or looping link, a FIFO,
a corrupt file, a head the base cannot take), is listed UNAVAILABLE with the reason, and start-up
goes on.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Optional

from liedeploy.errors import LieError
from liedeploy.serving.errors import BadRequest, NotFound, Unavailable

__all__ = ["ServingState", "BASE_TASK", "TASK_NAME", "task_file", "check_task_name"]

BASE_TASK = "base"
TASK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_task_name(task: str) -> None:
    """Refuse (400, one sentence) a name that is not a task name."""
    if not isinstance(task, str) or not TASK_NAME.fullmatch(task):
        raise BadRequest(f"task name {task!r} is not a task name (letters, digits, '.', '_' and '-', "
                         "at most 128, not starting with '.')")


def task_file(folder: Optional[str], task: str, suffix: str) -> str:
    """The file ``{task}{suffix}`` in the adapters ``folder``: the one place a task becomes a path.

    Never a path from a request: the name is checked first (400), ``base`` is the base model (400).
    """
    check_task_name(task)
    if task == BASE_TASK:
        raise BadRequest(f"'{BASE_TASK}' is the base model; an adapter file named {BASE_TASK}{suffix} is refused")
    if not folder:
        raise BadRequest("the server has no adapters folder to load tasks from")
    return os.path.join(folder, task + suffix)


class ServingState:
    """Tasks and their states, the backend, the batcher, limits and metrics of one server.

    Args:
        backend: a :class:`~liedeploy.serving.backend.Backend`.
        adapters_dir: the folder of task files (``{task}.safetensors`` for torch).
        admin_token: bearer token for the model repository calls (None: they are refused, 403).
        max_body: largest request body in bytes (413 beyond).
        max_inflight_bytes: most request bytes read or decoded at once (503 beyond; default 4 x max_body).
        batching: keyword arguments of :class:`~liedeploy.serving.batcher.Batcher`.
        request_timeout: seconds an infer request may take before it is answered 503.
    """

    def __init__(self, backend, adapters_dir: Optional[str], *, admin_token: Optional[str] = None,
                 max_body: int = 64 << 20, max_inflight_bytes: Optional[int] = None,
                 batching: Optional[dict] = None, request_timeout: float = 60.0, replica_id: Optional[str] = None):
        from liedeploy.serving.batcher import Batcher
        from liedeploy.serving.limits import BytesInFlight
        from liedeploy.serving.metrics import ServerMetrics

        self.backend = backend
        self.adapters_dir = adapters_dir
        self.admin_token = admin_token
        self.max_body = int(max_body)
        self.inflight_bytes = BytesInFlight(int(max_inflight_bytes or 4 * self.max_body))
        self.request_timeout = request_timeout
        self.replica_id = replica_id
        self.unavailable: dict = {}  # task -> reason
        self.generator = None  # a liedeploy.serving.generate.Generator for language-model tasks
        self.draining = False
        self.inflight = 0
        self._lock = threading.Lock()
        self.metrics = ServerMetrics(backend.stats, lambda: self.batcher.depth,
                                     lambda: self.generator.stats if self.generator is not None else None)
        self.batcher = Batcher(backend, on_batch=self.metrics.on_batch, on_task_error=self.mark_unavailable,
                               **(batching or {}))

    # -- tasks ------------------------------------------------------------------------------
    def scan(self) -> dict:
        """Register every task file of ``adapters_dir`` (headers only); returns ``{task: reason}`` refused.

        One file that cannot be used never stops the others: it is listed UNAVAILABLE with its reason.
        """
        if not self.adapters_dir:
            return {}
        for task, path in self.backend.discover(self.adapters_dir).items():
            try:
                check_task_name(task)
                if task == BASE_TASK:
                    raise BadRequest(f"an adapter file named {os.path.basename(path)} is refused: "
                                     f"'{BASE_TASK}' is the base model")
                self._register(task, path, prefetch=False)
            except (LieError, OSError) as exc:
                self.unavailable[task] = _reason(exc)
        return dict(self.unavailable)

    def task_file(self, task: str) -> str:
        return task_file(self.adapters_dir, task, self.backend.file_suffix)

    def load(self, task: str, *, prefetch: bool = True) -> None:
        """(Re)load ``task`` from its file; a file that cannot be used marks the task unavailable."""
        path = self.task_file(task)
        if not os.path.lexists(path):
            raise NotFound(f"no task file {os.path.basename(path)} in the adapters folder")
        self._register(task, path, prefetch=prefetch)

    def _register(self, task: str, path: str, *, prefetch: bool) -> None:
        try:
            self.backend.add(task, path)
            if prefetch:
                self.backend.prefetch(task)
        except (LieError, OSError) as exc:
            self.mark_unavailable(task, exc, registered_only=False)
            return
        with self._lock:
            self.unavailable.pop(task, None)

    def unload(self, task: str) -> None:
        check_task_name(task)
        if task == BASE_TASK:
            raise BadRequest("the base model cannot be unloaded")
        with self._lock:
            known = task in self.backend.tasks()
            if not known and task not in self.unavailable:
                raise NotFound(f"unknown task {task!r}")
            if known:
                self.backend.remove(task)
            self.unavailable.pop(task, None)

    def mark_unavailable(self, task: Optional[str], exc: BaseException, *, registered_only: bool = True) -> None:
        """``task`` cannot be used (its file failed when folded or loaded): UNAVAILABLE with the reason.

        ``registered_only``: only if the task is still registered, so that a request that was
        running while the task was unloaded does not bring it back as a ghost.
        """
        if task is None:
            return
        with self._lock:
            registered = task in self.backend.tasks()
            if registered_only and not registered:
                return
            self.unavailable[task] = _reason(exc)
            if registered:
                try:
                    self.backend.remove(task)
                except LieError:
                    pass

    def resolve(self, task: str) -> Optional[str]:
        """The backend's task for a model name (``base`` -> None); 404 unknown, 503 unavailable.

        The errors name only the task asked for, never the others.
        """
        if task == BASE_TASK:
            return None
        if task in self.unavailable:
            raise Unavailable(f"task {task!r} is unavailable: {self.unavailable[task]}")
        if task not in self.backend.tasks():
            raise NotFound(f"unknown task {task!r}")
        return task

    def index(self) -> list:
        rows = [{"name": BASE_TASK, "version": "1", "state": "READY", "reason": ""}]
        rows += [{"name": t, "version": "1", "state": "READY", "reason": ""} for t in sorted(self.backend.tasks())]
        rows += [{"name": t, "version": "1", "state": "UNAVAILABLE", "reason": r}
                 for t, r in sorted(self.unavailable.items()) if t != BASE_TASK]
        return rows


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, LieError) else f"{type(exc).__name__}: {text}"
