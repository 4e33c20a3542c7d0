"""The batcher's pipeline: folds run beside batches, never before them, and never make a request
wait past max_wait (fake backends with slow folds; bounded in time)."""

import asyncio
import threading
import time

import numpy as np

from liedeploy.serving.batcher import Batcher


class SlowFolds:
    """A backend whose folds take ``fold_s`` (single-flight per task, like the bank) and record events."""

    kind = "fake"

    def __init__(self, fold_s=0.3, run_s=0.01, resident=()):
        self.fold_s, self.run_s = fold_s, run_s
        self.resident = set(resident)
        self.events: list = []
        self.lock = threading.Lock()
        self.locks: dict = {}

    def is_resident(self, task):
        return task is None or task in self.resident

    def prefetch(self, task):
        with self.lock:
            lk = self.locks.setdefault(task, threading.Lock())
        with lk:  # one fold per task: a second caller waits for the first
            if task in self.resident:
                return
            self.events.append(("fold_start", task, time.monotonic()))
            time.sleep(self.fold_s)
            self.resident.add(task)
            self.events.append(("fold_end", task, time.monotonic()))

    def run(self, task, inputs):
        if task is not None and task not in self.resident:
            self.prefetch(task)  # as the bank does: a batch of a cold task folds it first
        self.events.append(("run", task, time.monotonic()))
        time.sleep(self.run_s)
        return {"y": inputs["x"] * 2}


async def _submit_all(b, jobs, timeout=10):
    futs = [(task, time.monotonic(), b.submit(task, {"x": np.ones((1, 2), np.float32)}, 1)) for task in jobs]
    done = []
    for task, t0, f in futs:
        await asyncio.wait_for(f, timeout)
        done.append((task, time.monotonic() - t0))
    return done


def test_a_batch_never_runs_before_its_fold_has_finished():
    backend = SlowFolds(fold_s=0.2)
    b = Batcher(backend, max_batch=4, max_delay=0.001, max_wait=5.0)
    try:
        asyncio.run(_submit_all(b, ["a", "b", "c", "a", "b", "c"]))
    finally:
        b.close()
    ends = {}
    for kind, task, t in backend.events:
        if kind == "fold_end":
            ends[task] = t
        if kind == "run":
            assert task in ends and ends[task] <= t, backend.events
    assert sorted(t for k, t, _ in backend.events if k == "fold_start") == ["a", "b", "c"]  # one fold each


def test_requests_of_a_folded_task_never_wait_past_max_wait_while_folds_run():
    backend = SlowFolds(fold_s=0.6, run_s=0.005, resident={"hot"})
    b = Batcher(backend, max_batch=4, max_delay=0.001, max_wait=0.2)
    try:
        async def scenario():
            cold = asyncio.ensure_future(_submit_all(b, ["cold1", "cold2"]))
            await asyncio.sleep(0.05)  # the prefetch thread is folding now
            hot = []
            for _ in range(5):
                hot += await _submit_all(b, ["hot"])
                await asyncio.sleep(0.05)
            await cold
            return hot

        waits = asyncio.run(scenario())
    finally:
        b.close()
    assert max(w for _, w in waits) < 0.2, waits
    assert b.prefetched >= 1


def test_a_failing_prefetch_is_reported_by_the_batch_not_retried_in_a_loop():
    class Broken(SlowFolds):
        def prefetch(self, task):
            self.events.append(("fold_start", task, time.monotonic()))
            raise RuntimeError("corrupt factors")

        def run(self, task, inputs):
            raise RuntimeError("corrupt factors")

    backend = Broken()
    b = Batcher(backend, max_batch=4, max_delay=0.001, max_wait=0.5)
    try:
        async def one():
            f = b.submit("bad", {"x": np.ones((1, 2), np.float32)}, 1)
            try:
                await asyncio.wait_for(f, 5)
            except Exception as exc:  # noqa: BLE001
                return exc

        exc = asyncio.run(one())
    finally:
        b.close()
    assert "corrupt factors" in str(exc)
    assert sum(1 for k, *_ in backend.events if k == "fold_start") <= 2


def test_no_thread_changes_the_torch_thread_count():
    import torch

    class Probe(SlowFolds):
        def run(self, task, inputs):
            self.events.append(("threads", torch.get_num_threads(), time.monotonic()))
            return super().run(task, inputs)

    before = torch.get_num_threads()
    backend = Probe(fold_s=0.05)
    b = Batcher(backend, max_batch=4, max_delay=0.001, max_wait=1.0)
    try:
        asyncio.run(_submit_all(b, ["a", "b", "a"]))
    finally:
        b.close()
    assert {n for k, n, _ in backend.events if k == "threads"} == {before} and torch.get_num_threads() == before


def _picks(b):
    """The order in which ``b`` takes its queued tasks (picked one after another, nothing run)."""
    order = []
    with b._cv:
        while b._queues:
            task, _ = b._pick(time.monotonic() + 0.01)  # every queue is due (max_delay passed), none starving
            order.append(task)
            b._take(task)
    return order


def test_among_folded_tasks_the_fullest_queue_goes_first_and_max_wait_still_bounds_every_wait():
    async def scenario():
        backend = SlowFolds(resident={"a", "b", "c"})
        b = Batcher(backend, max_batch=8, max_delay=0.001, max_wait=0.5, fold_ahead=0)
        b.close()  # no worker takes anything: the scheduler's choices are read one by one
        for task in ["a", "b", "b", "b", "c", "c"]:
            b.submit(task, {"x": np.ones((1, 2), np.float32)}, 1)
        first = _picks(b)
        for task in ["a", "b", "b"]:
            b.submit(task, {"x": np.ones((1, 2), np.float32)}, 1)
        b._queues["a"][0].arrived -= 1.0  # a's request has waited past max_wait: served first
        second = _picks(b)
        return first, second

    first, second = asyncio.run(scenario())
    assert first == ["b", "c", "a"]  # 3 queued, then 2 (ties would go to the oldest), then 1
    assert second == ["a", "b"]


class TwoProcesses(SlowFolds):
    """A fake backend of two worker processes: ``held[k]`` is what process k holds folded; the
    calling thread's process is the one given to :meth:`bind_worker` (``ProcessBackend``'s contract;
    its :meth:`takes` also balances cold tasks, tested with the server)."""

    def __init__(self, held):
        super().__init__(fold_s=0.0, run_s=0.0)
        self.held = held
        self.local = threading.local()

    def bind_worker(self, index):
        self.local.k = index % len(self.held)

    def is_resident(self, task):
        return task is None or task in self.held[self.local.k]

    def takes(self, task):  # held here, or held nowhere
        return task in self.held[self.local.k] or not any(task in h for h in self.held)


def test_with_worker_processes_a_task_keeps_to_its_process_until_a_full_batch_waits():
    from liedeploy.serving.batcher import _NOTHING

    def submit(b, tasks):
        for task in tasks:
            b.submit(task, {"x": np.ones((1, 2), np.float32)}, 1)

    def pick(b, backend, k, late=0.01):
        backend.bind_worker(k)
        task, wait = b._pick(time.monotonic() + late)
        if task is not _NOTHING:
            b._take(task)
        return task, wait

    async def scenario():
        backend = TwoProcesses([{"a"}, {"b"}])
        b = Batcher(backend, max_batch=4, max_delay=0.001, max_wait=0.5, fold_ahead=0)
        b.close()  # the scheduler's choices are read for each process in turn, nothing runs
        out = {}
        with b._cv:
            submit(b, ["a", "a", "a", "b", "c"])
            out["own"] = pick(b, backend, 1)[0]  # its own task, though "a" has more queued
            out["cold"] = pick(b, backend, 1)[0]  # then a task no process holds
            out["held"] = pick(b, backend, 1)  # only "a" is left, held by process 0: not taken
            submit(b, ["a"])
            out["full"] = pick(b, backend, 1)[0]  # a full batch of "a" waits: process 1 takes it too
            submit(b, ["a", "b"])
            # both have waited past max_wait, "a" longer: process 1 runs its own "b" first (a starving
            # task held elsewhere is not folded here a second time while it has work), then, with
            # nothing else to run, helps with "a"
            out["starving_elsewhere"] = [pick(b, backend, 1, late=0.6)[0], pick(b, backend, 1, late=0.6)[0]]
            submit(b, ["a", "b"])
            out["starving_home"] = pick(b, backend, 0, late=0.6)[0]  # its own process: first
        return out

    out = asyncio.run(scenario())
    assert out["own"] == "b" and out["cold"] == "c"
    task, wait = out["held"]
    assert task is _NOTHING and 0 < wait <= 0.5  # it looks again by the time the request would starve
    assert out["full"] == "a"
    assert out["starving_elsewhere"] == ["b", "a"]
    assert out["starving_home"] == "a"


def test_with_worker_processes_a_request_wakes_the_worker_of_the_process_that_holds_its_task():
    """Two batch workers wait idle; each request must reach the one whose process holds its task at
    once (a single notify could wake the other, which leaves the task alone: the request would wait
    for a poll)."""
    backend = TwoProcesses([{"a"}, {"b"}])
    b = Batcher(backend, max_batch=4, max_delay=0.001, max_wait=2.0, workers=2, fold_ahead=0)
    try:
        waits = []
        for task in ["a", "b"] * 5:
            time.sleep(0.02)  # both workers idle again
            waits += [w for _, w in asyncio.run(_submit_all(b, [task]))]
    finally:
        b.close()
    assert max(waits) < 0.5, waits  # well under max_wait (2 s): no request waited for a poll
