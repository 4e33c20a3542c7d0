"""Batch workers in processes of their own (``liedeploy serve --processes N``): the torch backend on CPU.

Why: torch releases the GIL inside each operation and takes it back after it, so two batch workers
in one process (``--workers 2``) hand the GIL to each other and to the event loop's HTTP work a few
hundred times per forward. On bench_serve's model, two single-threaded forwards in one process
give 2.08x and 1.45x the samples/s of one two-threaded forward at batches of 1 and 5 (oneDNN's
two-thread split of these small convolutions wastes much of the second core), but a server with
two worker threads kept only 0.97-1.16x (benchmarks/bench_workers.py). Worker processes keep more of it: each has its own GIL, its
own :class:`~liedeploy.serving.backends.torch.TorchBackend` (a bank with ``cache_bytes / N`` and
``cores / N`` torch threads) and runs its batches on its main thread; this process keeps the HTTP
server, the queues and the scheduler, and imports no torch. bench_serve measured 1.20x the
requests/s of one process at 1,000 tasks, 1.08x at 10 tasks and 1.06x at 1 (smaller batches: the
queue is split), at about 530 MB more memory per process (the runtime, the model, the packed base).

Tasks keep to a process: a task folded in one worker process is scheduled there (the batcher asks
:meth:`ProcessBackend.is_resident` and :meth:`ProcessBackend.takes` from worker thread k, which
answer for process k), and a task no process holds goes to the one holding the fewest tasks, so N
caches of ``cache_bytes / N`` hold as many distinct tasks as one cache of ``cache_bytes``. A task
that runs elsewhere is taken here only when a full batch of it waits (a single hot task then runs
in every process); a request that has waited ``--max-wait-ms`` is served first by the process that
holds its task.

A worker process that dies is started again by its batch worker thread (the batch that was
running is answered 503; the registered tasks are registered again); the others serve meanwhile.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
import time
from typing import Optional, Sequence

from liedeploy.errors import ConfigError, LieError
from liedeploy.serving.backend import discover_task_files, run_mixed_by_task
from liedeploy.serving.errors import Unavailable

__all__ = ["ProcessBackend", "WorkerLost", "unsupported", "worker_config"]

_OPS = ("run", "add", "remove", "prefetch", "outputs")  # what a worker process does when asked
_START_TIMEOUT = 600.0  # seconds a worker process may take to build its backend


class WorkerLost(Unavailable):
    """The worker process running a batch exited (503: retry; it is being started again)."""


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a :class:`LieError` (or RuntimeError) with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception that does not pickle is sent as text
        cls = LieError if isinstance(exc, LieError) else RuntimeError
        return cls(f"{type(exc).__name__}: {exc}")


def _worker_main(cfg, conn) -> None:
    """A worker process: build the torch backend, then answer ``(op, args)`` until told to stop or
    the parent goes away. Every answer carries the resident tasks (when they changed) and the stats."""
    import signal

    # Ctrl-C reaches the whole process group: the parent drains, then stops us. SIGTERM keeps its
    # default: multiprocessing's exit handler terminates daemonic children that way if the parent
    # exits without stopping them, and waits for them
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from liedeploy.core.fused import fold_path_reason
        from liedeploy.serving.server import build_backend

        backend = build_backend(cfg)
        path, why = fold_path_reason(backend.device)  # builds the fold kernel now, not at the first fold
        conn.send(("ready", {"inputs": backend.inputs(), "pack_reason": backend.pack_reason,
                             "fold_reason": f"{path} ({why})", "pid": os.getpid()}, None, backend.stats()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which refuses to start
        conn.send(("err", _portable(exc), None, {}))
        return
    sent: Optional[tuple] = None
    while True:
        try:
            rid, op, args = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if op == "stop":
            return
        try:
            if op not in _OPS:
                raise LieError(f"unknown worker operation {op!r}")
            kind, value = "ok", getattr(backend, op)(*args)
        except Exception as exc:  # noqa: BLE001 - answered to the parent as it is
            kind, value = "err", _portable(exc)
        resident = tuple(backend.bank.resident)
        changed = resident != sent
        sent = resident
        conn.send((rid, kind, value, resident if changed else None, backend.stats()))


class _Reply:
    __slots__ = ("done", "value")

    def __init__(self):
        self.done = threading.Event()
        self.value = None


class _Worker:
    """One worker process and the pipe to it. A call is sent at once and the process answers in
    order; a reader thread hands each answer to its caller, so that a registry call (add, remove)
    from the event loop queues behind a running batch instead of waiting for a lock it holds."""

    def __init__(self, index: int, cfg, ctx):
        self.index, self.cfg, self.ctx = index, cfg, ctx
        self.lock = threading.Lock()  # sending, and the table of calls waiting for an answer
        self.resident: frozenset = frozenset()
        self.stats: dict = {}
        self.info: dict = {}
        self.proc = self.conn = None
        self.lost: Optional[str] = None  # why the process is gone, until it is started again
        self.incoming: set = set()  # cold tasks sent to it to run, not yet resident (a fold on the way)
        self._waiting: dict = {}
        self._next = 0

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, args=(self.cfg, child), name=f"liedeploy-worker-{self.index}",
                                     daemon=True)
        self.proc.start()
        child.close()
        with self.lock:
            self.conn = parent
            self.resident, self.lost = frozenset(), None
            self.incoming = set()
            leftover, self._waiting = self._waiting, {}
        for reply in leftover.values():
            reply.value = ("lost", None)
            reply.done.set()

    def _read(self, conn, proc) -> None:
        """The reader thread: answers to their callers until the pipe closes."""
        while True:
            try:
                rid, kind, value, resident, stats = conn.recv()
            except (EOFError, OSError):
                break
            if resident is not None:
                self.resident = frozenset(resident)
            self.stats = stats
            with self.lock:
                reply = self._waiting.pop(rid, None)
            if reply is not None:
                reply.value = (kind, value)
                reply.done.set()
        proc.join(5)
        with self.lock:
            if self.conn is not conn:  # started again meanwhile: start() answered what was waiting
                return
            self.lost = (f"batch worker process {self.index} exited (exit code {proc.exitcode}) while running "
                         f"this request; it is being started again")
            waiting, self._waiting = self._waiting, {}
        for reply in waiting.values():
            reply.value = ("lost", None)
            reply.done.set()

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.1):
            if not self.proc.is_alive():
                raise LieError(f"worker process {self.index} exited while starting (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise LieError(f"worker process {self.index} did not start within {timeout:g} s")
        kind, value, _, stats = self.conn.recv()
        if kind == "err":
            raise value
        self.info, self.stats = value, stats
        threading.Thread(target=self._read, args=(self.conn, self.proc), name=f"liedeploy-worker-{self.index}-reader",
                         daemon=True).start()

    def call(self, op: str, *args):
        reply = _Reply()
        with self.lock:
            if self.lost is not None:
                raise WorkerLost(self.lost)
            rid, self._next = self._next, self._next + 1
            self._waiting[rid] = reply
            try:
                self.conn.send((rid, op, args))
            except (OSError, ValueError):
                pass  # the reader sees the pipe close and answers every waiting call
        reply.done.wait()
        kind, value = reply.value
        if kind == "lost":
            raise WorkerLost(self.lost or f"batch worker process {self.index} exited")
        if kind == "err":
            raise value
        return value

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        try:
            with self.lock:
                self.conn.send((-1, "stop", ()))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.conn.close()


def unsupported(cfg) -> Optional[str]:
    """Why worker processes cannot run what ``cfg`` names (a ServeConfig or the CLI's arguments:
    ``backend``, ``device``, ``hf_model``), or None."""
    if cfg.backend != "torch" or not str(cfg.device).startswith("cpu") or cfg.hf_model:
        return "--processes runs the torch backend on CPU (not with --device cuda, --backend ort/trt or --hf-model)"
    return None


def worker_config(cfg, processes: int):
    """The :class:`~liedeploy.serving.server.ServeConfig` of one worker process: one process, one
    batch worker, ``cache_bytes / processes`` and ``threads`` (default: the server's share rule,
    cores / processes)."""
    from liedeploy.serving.server import resolved_threads

    shared = dataclasses.replace(cfg, processes=processes)
    resolved_threads(shared)  # sets threads where not given
    return dataclasses.replace(cfg, processes=1, workers=1, tokenizer_object=None,
                               cache_bytes=None if cfg.cache_bytes is None else int(cfg.cache_bytes) // processes,
                               threads=shared.threads)


class ProcessBackend:
    """The serving :class:`~liedeploy.serving.backend.Backend` over ``processes`` worker processes,
    each a :class:`~liedeploy.serving.backends.torch.TorchBackend` (CPU).

    Batch worker thread k of the :class:`~liedeploy.serving.batcher.Batcher` calls :meth:`bind_worker`
    with k; from then on its :meth:`run` and :meth:`is_resident` go to process k.
    """

    kind = "torch"
    file_suffix = ".safetensors"
    device = None  # the worker processes hold the model; this one imports no torch

    def __init__(self, cfg, processes: int):
        import multiprocessing

        if processes < 2:
            raise ConfigError(f"--processes must be >= 2 for worker processes, got {processes}")
        why = unsupported(cfg)
        if why:
            raise ConfigError(why)
        self.processes = int(processes)
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads and locks
        child_cfg = worker_config(cfg, self.processes)
        self._workers = [_Worker(k, child_cfg, ctx) for k in range(self.processes)]
        self._tasks: dict = {}  # task -> path, registered in every worker process
        self._outputs: dict = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self.restarts = 0
        try:
            for w in self._workers:
                w.start()
            for w in self._workers:  # they build their models side by side
                w.wait_ready()
        except BaseException:
            self.close()
            raise
        info = self._workers[0].info
        self._inputs = list(info["inputs"])
        self.pack_reason = info["pack_reason"]
        self.fold_reason = info["fold_reason"]

    # -- which process ------------------------------------------------------------------------
    def bind_worker(self, index: int) -> None:
        """Batch worker thread ``index`` runs its batches in process ``index % processes``."""
        self._local.worker = self._workers[index % self.processes]

    def _bound(self) -> Optional[_Worker]:
        return getattr(self._local, "worker", None)

    def _home(self, task: Optional[str]) -> _Worker:
        """Where an unbound call goes: a process that holds ``task``, else the first."""
        for w in self._workers:
            if task in w.resident:
                return w
        return self._workers[0]

    def is_resident(self, task: Optional[str]) -> bool:
        """From a bound batch worker: whether its process holds ``task`` folded; else any process."""
        if task is None:
            return True
        w = self._bound()
        return task in w.resident if w is not None else any(task in v.resident for v in self._workers)

    def takes(self, task: Optional[str]) -> bool:
        """From a bound batch worker: whether its process is where ``task`` runs now: it holds the task
        (or is folding it), or no process does and it holds no more tasks than any other (so that
        the caches fill evenly: N caches of ``cache_bytes / N`` then hold as many tasks as one)."""
        w = self._bound()
        if task is None or w is None or task in w.resident or task in w.incoming:
            return True
        others = [v for v in self._workers if v is not w]
        if any(task in v.resident or task in v.incoming for v in others):
            return False
        mine = len(w.resident | w.incoming)
        return all(mine <= len(v.resident | v.incoming) for v in others)

    # -- registry (every process) ---------------------------------------------------------------
    def discover(self, folder: str) -> dict:
        return discover_task_files(folder, self.file_suffix)

    def tasks(self) -> list:
        with self._lock:
            return list(self._tasks)

    def _each(self, op: str, *args) -> None:
        """``op`` in every worker process; the first refusal is raised once all have been asked (a
        process that is gone is skipped: it is given the registry when it is started again)."""
        errors = []
        for w in self._workers:
            try:
                w.call(op, *args)
            except WorkerLost:
                pass
            except LieError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def add(self, task: str, path: str) -> None:
        try:
            self._each("add", task, path)
        except LieError:
            with self._lock:
                known = task in self._tasks
            if not known:  # no process keeps a task this process does not list
                try:
                    self._each("remove", task)
                except LieError:
                    pass
            raise
        with self._lock:
            self._tasks[task] = path
            self._outputs.pop(task, None)

    def remove(self, task: str) -> None:
        with self._lock:
            self._tasks.pop(task, None)
            self._outputs.pop(task, None)
        self._each("remove", task)

    def prefetch(self, task: str) -> None:
        (self._bound() or self._home(task)).call("prefetch", task)

    # -- specs ------------------------------------------------------------------------------------
    def inputs(self) -> list:
        return list(self._inputs)

    def outputs(self, task: Optional[str]) -> list:
        if task not in self._outputs:
            self._outputs[task] = (self._bound() or self._home(task)).call("outputs", task)
        return self._outputs[task]

    # -- inference ----------------------------------------------------------------------------------
    def run(self, task: Optional[str], inputs: dict) -> dict:
        w = self._bound() or self._home(task)
        if w.lost is not None:
            try:
                self._restart(w)
            except Exception as exc:  # noqa: BLE001 - not this task's fault: 503, and tried again next batch
                w.lost = f"batch worker process {w.index} could not be started again ({exc})"
                raise WorkerLost(w.lost) from None
        cold = task is not None and task not in w.resident
        if cold:
            w.incoming.add(task)
        try:
            return w.call("run", task, inputs)
        finally:
            if cold:
                w.incoming.discard(task)

    def _restart(self, w: _Worker) -> None:
        """Start process ``w`` again and register every task in it (on its own batch worker thread)."""
        w.stop(1.0)
        w.start()
        w.wait_ready()
        with self._lock:
            self.restarts += 1
            tasks = dict(self._tasks)
        for task, path in tasks.items():
            try:
                w.call("add", task, path)
            except LieError:
                pass  # refused now as in the other processes at their next fold

    def run_mixed(self, tasks: Sequence[Optional[str]], inputs: dict) -> dict:
        return run_mixed_by_task(self.run, tasks, inputs)

    def stats(self) -> dict:
        """The worker processes' counters summed (``resident``: distinct tasks held; a task held in
        two processes counts once there and twice in ``resident_bytes``)."""
        out: dict = {}
        for w in self._workers:
            for k, v in w.stats.items():
                if isinstance(v, (int, float)):
                    out[k] = out.get(k, 0) + v
        out["registered"] = len(self._tasks)
        out["resident"] = len(frozenset().union(*(w.resident for w in self._workers)))
        for k in ("fold_fused", "packed_convs"):  # the same in every process
            if k in self._workers[0].stats:
                out[k] = self._workers[0].stats[k]
        out["worker_processes"] = self.processes
        out["worker_restarts"] = self.restarts
        return out

    def close(self) -> None:
        for w in self._workers:
            w.stop()
