"""Dynamic batching with a fold-aware scheduler, off the event loop.

Requests queue per task. A batch of one task is formed when it holds ``max_batch`` samples or its
oldest request has waited ``max_delay``; among the tasks that have a batch ready the scheduler
takes, in order:

1. any task whose oldest request has waited ``max_wait`` (the bound: nothing waits past it);
2. else a task that is already folded (resident), the one with the most queued samples first (ties:
   the oldest request), since a larger batch costs less per sample; no refold thrash;
3. else the cold task with the most queued samples (one fold serves all its queued requests).

With a backend of worker processes (``--processes``), worker thread k is bound to process k
(``backend.bind_worker(k)``), "resident" means held by that process, and every step skips the tasks
that ``backend.takes(task)`` sends to another process (held or being folded there, or a cold task
for a process holding fewer tasks) unless a full batch of one waits: a request that has waited
``max_wait`` is served first by the process that holds its task, and by another only when that one
has nothing else to run. Taking it in a busy process (as an earlier version did) folded the task
twice and evicted another for it; at 1,000 tasks, where a saturated server keeps most requests
waiting past ``max_wait`` whatever the order, that cost 4% of the requests/s, and at 10 tasks it
refolded 7-20 tasks per 10 s (four alternating rounds, ad hoc; README).

Taking the fullest resident queue rather than the oldest request: with 32 closed-loop clients over
10 resident tasks, batches of 5.4 samples instead of 5.0 and 1.03x the requests/s, lower p50, the
p99 bounded by ``max_wait`` as before (three alternating rounds, ad hoc; README).

Batches run on worker threads (never on the event loop); results go back to each request's
asyncio future with ``call_soon_threadsafe``.

Folds overlap inference: a prefetch thread folds the cold task with the most queued samples while
the workers run batches of folded tasks, so cores are not idle while requests wait for a fold.
Both use the process's torch threads (``torch.set_num_threads`` in one thread also changes the
default of every thread that has not set its own, so no thread here sets it).
A worker never folds: it runs folded tasks (the oldest first once a request has waited
``max_wait``), and a cold task once the prefetch thread has folded it; the prefetch thread takes
the cold task waiting longest once one has waited ``max_wait``, else the one with the most queued
samples. A fold that fails leaves the task to a worker, whose batch reports the error. At most ``fold_ahead`` (default 4) folded tasks wait for a worker, so
prefetching never evicts what it folded before it ran; ``fold_ahead=0`` turns the prefetch thread
off (workers fold inline). The README's serving table gives the measured effect.

One request never poisons its batch: when a batch of several requests fails with anything but a
task error, its requests are run again one by one; the ones that fail alone are answered 400 with
the model's reason, the others get their outputs. A task error (the task's file cannot be folded)
makes the task unavailable (503) for every request of it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from liedeploy.errors import LieError
from liedeploy.serving.errors import BadRequest, ProtocolError, QueueFull

__all__ = ["Batcher", "Pending"]

_NOTHING = object()  # no batch is due (None is a task: the base model)


@dataclass
class Pending:
    task: Optional[str]
    inputs: dict
    n: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)
    shape_key: tuple = ()

    def __post_init__(self):
        self.shape_key = tuple((k, v.shape[1:]) for k, v in sorted(self.inputs.items()))


class Batcher:
    """Queues, scheduler and worker threads in front of one :class:`~liedeploy.serving.backend.Backend`.

    Args:
        backend: the engine.
        max_batch: most samples per batch.
        max_delay: seconds a request may wait for others to join its batch.
        max_queue: most requests waiting (beyond: :class:`QueueFull`, HTTP 503).
        max_wait: seconds after which a request is served first, folded task or not.
        workers: threads running batches (1 suits a CPU backend that uses all cores per call).
        on_batch: ``(task, samples, queue_seconds_list, run_seconds)`` after each batch (metrics).
        on_task_error: ``(task, exception)`` when a batch failed because the task cannot be used.
        start_first_worker: ``False``: the caller runs worker 0 with :meth:`run_worker` on a thread
            of its own choosing (the server's compute thread, which also loaded the model).
    """

    def __init__(self, backend, *, max_batch: int = 8, max_delay: float = 0.005, max_queue: int = 1024,
                 max_wait: float = 0.2, workers: int = 1, on_batch: Optional[Callable] = None,
                 on_task_error: Optional[Callable] = None, fold_ahead: int = 4,
                 start_first_worker: bool = True):
        self.backend = backend
        self.max_batch, self.max_delay, self.max_queue, self.max_wait = max_batch, max_delay, max_queue, max_wait
        self.on_batch, self.on_task_error = on_batch, on_task_error
        self._queues: dict = {}
        self._rows: dict = {}  # task -> samples queued (kept, not summed at every pick)
        self._count = 0
        self._running = 0
        self._cv = threading.Condition()
        self._stop = False
        self._folding: set = set()  # tasks the prefetch thread is folding now
        self._ahead: set = set()  # tasks it folded whose batches no worker has taken yet
        self.prefetch_depth = max(0, int(fold_ahead))
        prefetch = self.prefetch_depth > 0
        # tasks the prefetch thread could not make resident (the fold failed, or the cache cannot
        # hold the task): a worker runs them as they are, folding inline, and reports any error
        self._inline: set = set()
        self.prefetched = 0
        self._prefetching = bool(prefetch)
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"liedeploy-batcher-{i}", daemon=True)
                         for i in range(0 if start_first_worker else 1, max(1, workers))]
        if prefetch:
            self._threads.append(threading.Thread(target=self._prefetch_loop, name="liedeploy-prefetch", daemon=True))
        for t in self._threads:
            t.start()

    # -- producer side (event loop) -----------------------------------------------------------
    def submit(self, task: Optional[str], inputs: dict, n: int) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if self._count >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} requests waiting); retry later")
            self._queues.setdefault(task, deque()).append(Pending(task, inputs, n, fut, loop))
            self._rows[task] = self._rows.get(task, 0) + n
            self._count += 1
            # every waiting worker: with worker processes only the one whose process holds the task
            # takes it, and a single notify could wake another
            self._cv.notify_all()
        return fut

    @property
    def depth(self) -> int:
        return self._count

    @property
    def idle(self) -> bool:
        with self._cv:
            return self._count == 0 and self._running == 0

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)

    # -- scheduler ------------------------------------------------------------------------------
    def _pick(self, now: float):
        """``(task, wait seconds)``: the task to run now (``None`` is the base), or ``_NOTHING`` and how long to wait."""
        ready, next_due = [], None
        for task, q in self._queues.items():
            if not q:
                continue
            oldest = q[0].arrived
            rows = self._rows[task]
            due = oldest + self.max_delay
            if rows >= self.max_batch or now >= due:
                ready.append((task, oldest, rows))
            else:
                next_due = due if next_due is None else min(next_due, due)
        if not ready:
            return _NOTHING, (None if next_due is None else max(0.0, next_due - now))
        # folded tasks, and those the prefetch thread could not make resident
        resident = {r[0] for r in ready if r[0] in self._inline or self.backend.is_resident(r[0])}
        takes = getattr(self.backend, "takes", None)
        if takes is not None:  # worker processes: a task that runs in another one runs there (that
            # process serves its own starving tasks first), unless a full batch of it waits (then it
            # runs in both), or this process has nothing else to run and a request of it has waited
            # max_wait. Taking a starving task elsewhere while this process had work of its own
            # folded it twice and evicted a task for it: 1.04x the requests/s at 1,000 tasks without
            # that, where most requests wait past max_wait anyway (32 clients, a saturated server)
            held = [r for r in ready if r[2] < self.max_batch and r[0] not in resident and not takes(r[0])]
            if held:
                ready = [r for r in ready if r not in held]
                if not ready:
                    late = [r for r in held if now - r[1] >= self.max_wait]
                    if late:  # idle otherwise: help the process that holds it
                        return min(late, key=lambda r: r[1])[0], 0.0
                    return _NOTHING, max(0.001, min(r[1] for r in held) + self.max_wait - now)
        starving = [r for r in ready if now - r[1] >= self.max_wait and (r[0] in resident or not self._prefetching)]
        if starving:
            return min(starving, key=lambda r: r[1])[0], 0.0
        if resident:  # the most queued samples (the cheapest forward per sample), then the oldest
            return max((r for r in ready if r[0] in resident), key=lambda r: (r[2], -r[1]))[0], 0.0
        if self._prefetching:  # cold tasks are folded by the prefetch thread, which notifies when a
            return _NOTHING, 0.05  # fold is done: a worker never folds inline, so a folded task's
            # next request never waits behind a fold
        return max(ready, key=lambda r: (r[2], -r[1]))[0], 0.0

    # -- prefetch: folds beside the batches ---------------------------------------------------
    def _cold_candidate(self):
        """The queued task that is neither folded nor being folded: the one waiting longest when a
        request has waited ``max_wait``, else the one with the most queued samples."""
        best, now = None, time.monotonic()
        for task, q in self._queues.items():
            if task is None or not q or task in self._folding or task in self._inline or self.backend.is_resident(task):
                continue
            starving = now - q[0].arrived >= self.max_wait
            key = (starving, -q[0].arrived if starving else self._rows[task], -q[0].arrived)
            if best is None or key > best[0]:
                best = (key, task)
        return _NOTHING if best is None else best[1]

    def _ahead_ok(self) -> bool:
        """Whether the prefetch thread may fold another task now (at most ``prefetch_depth`` folded
        tasks wait for a worker, so prefetching never evicts what it folded before it ran)."""
        return len(self._ahead) < self.prefetch_depth

    def run_worker(self) -> None:
        """Worker 0's loop on the calling thread, until :meth:`close` (``start_first_worker=False``)."""
        self._work(0)

    def _prefetch_loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    task = self._cold_candidate() if self._ahead_ok() else _NOTHING
                    if task is not _NOTHING:
                        self._folding.add(task)
                        break
                    self._cv.wait(timeout=0.05)
            try:
                self.backend.prefetch(task)
                self.prefetched += 1
                kept = self.backend.is_resident(task)
            except Exception:  # noqa: BLE001 - the batch that runs the task reports it
                kept = False
            with self._cv:
                if not kept:
                    self._inline.add(task)
                elif task in self._queues:
                    self._ahead.add(task)
                self._folding.discard(task)
                self._cv.notify_all()

    def _take(self, task) -> list:
        self._inline.discard(task)
        self._ahead.discard(task)
        q = self._queues[task]
        first = q.popleft()
        batch, rows = [first], first.n
        keep = deque()
        while q and rows < self.max_batch:
            p = q.popleft()
            if p.shape_key == first.shape_key and rows + p.n <= self.max_batch:
                batch.append(p)
                rows += p.n
            else:
                keep.append(p)
        keep.extend(q)
        self._queues[task] = keep
        self._rows[task] -= rows
        if not keep:
            del self._queues[task]
            del self._rows[task]
        self._count -= len(batch)
        return batch

    def _work(self, index: int = 0) -> None:
        bind = getattr(self.backend, "bind_worker", None)
        if bind is not None:  # a backend of worker processes: this thread runs its batches in process index
            bind(index)
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    task, wait = self._pick(time.monotonic())
                    if task is not _NOTHING:
                        batch = self._take(task)
                        self._running += 1
                        break
                    self._cv.wait(timeout=wait)
            try:
                self._run(task, batch)
            finally:
                with self._cv:
                    self._running -= 1
                    self._cv.notify_all()

    def _run(self, task, batch: list) -> None:
        started = time.monotonic()
        batch = [p for p in batch if not p.future.cancelled()]
        if not batch:
            return
        try:
            inputs = {k: (batch[0].inputs[k] if len(batch) == 1 else np.concatenate([p.inputs[k] for p in batch]))
                      for k in batch[0].inputs}
            out = self.backend.run(task, inputs)
        except ProtocolError as exc:  # a refusal of the serving layer (a worker process lost): as it is
            for p in batch:
                _resolve(p, exc=exc)
            return
        except LieError as exc:
            if self.on_task_error:
                self.on_task_error(task, exc)
            for p in batch:
                _resolve(p, exc=exc)
            return
        except Exception as exc:  # noqa: BLE001 - one request's fault: find it, answer the others
            if len(batch) == 1:
                _resolve(batch[0], exc=_refused(exc))
            else:
                self._isolate(task, batch, started)
            return
        ran = time.monotonic() - started
        start = 0
        for p in batch:
            _resolve(p, result={k: (v[start: start + p.n] if isinstance(v, np.ndarray) else v) for k, v in out.items()})
            start += p.n
        if self.on_batch:
            self.on_batch(task, start, [started - p.arrived for p in batch], ran)


    def _isolate(self, task, batch: list, started: float) -> None:
        """Run the requests of a failed batch one by one: 400 for those that fail alone."""
        done = 0
        for p in batch:
            try:
                out = self.backend.run(task, p.inputs)
            except ProtocolError as exc:
                _resolve(p, exc=exc)
                continue
            except LieError as exc:
                if self.on_task_error:
                    self.on_task_error(task, exc)
                _resolve(p, exc=exc)
                continue
            except Exception as exc:  # noqa: BLE001 - the model refused this request's values
                _resolve(p, exc=_refused(exc))
                continue
            _resolve(p, result=out)
            done += p.n
        if self.on_batch and done:
            self.on_batch(task, done, [started - p.arrived for p in batch], time.monotonic() - started)


def _refused(exc: Exception) -> BadRequest:
    why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return BadRequest(f"the model cannot run this request ({type(exc).__name__}{': ' + why if why else ''})")


def _resolve(p: Pending, result=None, exc=None) -> None:
    def set_():
        if p.future.done():
            return
        if exc is not None:
            p.future.set_exception(exc)
        else:
            p.future.set_result(result)

    try:
        p.loop.call_soon_threadsafe(set_)
    except RuntimeError:  # the loop is closed: nobody waits for this answer any more
        pass
