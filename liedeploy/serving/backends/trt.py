"""TensorRT engines behind the server (``liedeploy serve --backend trt``): a runner and K refitted slots.

- :class:`TrtRunner`: one execution context of an engine; ``execute_async_v3`` with I/O bound to
  torch CUDA tensors (``set_tensor_address``), the batch size set per call through the optimization
  profile (``set_input_shape``).
- :class:`SlotLRU`: which of K engine slots serves a task (pure logic): a task already in a slot is
  a hit; a cold task takes the least recently used idle slot, which is refitted (from the pristine
  base) to it.
- :class:`TrtBackend`: the serving backend protocol over K slots (K copies of one plan on the GPU),
  each refitted to one task at a time; the batcher of the serving layer sits in front.

Without TensorRT or CUDA the backend refuses in one line (exit 1 from the CLI, nothing written).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from liedeploy.errors import ConfigError, LieError


__all__ = ["SlotLRU", "TrtRunner", "TrtBackend"]


class SlotLRU:
    """Assign tasks to ``k`` slots, least recently used first; a slot in use is never taken.

    ``acquire(task)`` -> ``(slot, needs_refit)`` and marks the slot busy; ``release(slot)`` when the
    batch is done. ``None`` if every slot is busy (the caller waits and retries).
    """

    def __init__(self, k: int):
        if k < 1:
            raise ConfigError(f"the number of engine slots must be >= 1, got {k}")
        self.k = k
        self.task_of: list = [None] * k  # what each slot holds (None: the base, or nothing yet)
        self.loaded = [False] * k
        self.busy = [0] * k
        self._order: OrderedDict = OrderedDict((i, None) for i in range(k))  # least recently used first
        self.refits = 0

    def slot_of(self, task) -> Optional[int]:
        for i in range(self.k):
            if self.loaded[i] and self.task_of[i] == task:
                return i
        return None

    def acquire(self, task):
        i = self.slot_of(task)
        if i is not None:
            self.busy[i] += 1
            self._order.move_to_end(i)
            return i, False
        idle = [j for j in self._order if self.busy[j] == 0]
        if not idle:
            return None
        j = idle[0]
        self.task_of[j], self.loaded[j] = task, True
        self.busy[j] += 1
        self._order.move_to_end(j)
        self.refits += 1
        return j, True

    def release(self, slot: int) -> None:
        self.busy[slot] -= 1

    def resident(self) -> list:
        return [self.task_of[i] for i in range(self.k) if self.loaded[i]]


class TrtRunner:
    """Run one engine (through its own execution context) on torch CUDA tensors."""

    def __init__(self, engine, stream=None):
        import torch

        from liedeploy.exporters.tensorrt import require_tensorrt  # the TensorRT stack: only when built

        trt = require_tensorrt()
        self.trt, self.engine = trt, engine
        self.context = engine.create_execution_context()
        self.stream = stream or torch.cuda.Stream()
        self.inputs, self.outputs = [], []
        self.dtypes = {}  # tensor name -> the torch dtype the engine binds
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (self.inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
            self.dtypes[name] = torch.from_numpy(np.zeros(1, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype

    def __call__(self, feeds: dict) -> dict:
        import torch

        bound = {}
        for name in self.inputs:
            t = torch.as_tensor(feeds[name]).cuda(non_blocking=True).to(self.dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(t.shape)):  # outside the profile: never run
                raise LieError(f"TensorRT refused input {name} of shape {list(t.shape)} (outside the engine's "
                               "optimization profile)")
            if not self.context.set_tensor_address(name, t.data_ptr()):
                raise LieError(f"TensorRT refused the address of input {name}")
            bound[name] = t
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise LieError(f"TensorRT could not infer the shape of output {name} ({list(shape)})")
            o = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            if not self.context.set_tensor_address(name, o.data_ptr()):
                raise LieError(f"TensorRT refused the address of output {name}")
            outs[name] = o
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LieError("TensorRT failed to run the engine")
        self.stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outs.items()}


def _profile_of(engine, trt) -> dict:
    """``{input: (engine shape, (min, opt, max) of profile 0 or None)}`` of an engine."""
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            continue
        shape = tuple(engine.get_tensor_shape(name))
        profile = None
        if engine.num_optimization_profiles > 0 and -1 in shape:
            profile = tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
        out[name] = (shape, profile)
    return out


class TrtBackend:
    """:class:`liedeploy.serving.backend.Backend` over K slots of one refittable engine."""

    kind = "trt"
    file_suffix = ".safetensors"

    def __init__(self, engine_path: str, base: str, input_specs: Sequence, *, slots: int = 2, max_batch: int = 8):
        from liedeploy.exporters.tensorrt import MANIFEST_SUFFIX, TrtTaskSwitcher, check_serving_profile, require_tensorrt

        trt = require_tensorrt()
        import torch

        self.base = base
        self._inputs = list(input_specs)
        self._paths: dict = {}
        manifest = os.path.splitext(engine_path)[0] + ".onnx" + MANIFEST_SUFFIX
        with open(engine_path, "rb") as f:
            plan = f.read()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.switchers, self.runners = [], []
        for _ in range(slots):
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise LieError(f"{engine_path}: TensorRT could not load this engine")
            if not self.runners:  # a fixed batch, or a profile below --max-batch: refused at start
                check_serving_profile(engine_path, _profile_of(engine, trt), max_batch)
            stream = torch.cuda.Stream()
            self.switchers.append(TrtTaskSwitcher(engine_path, base, manifest, engine=engine, stream=stream))
            self.runners.append(TrtRunner(engine, stream))
        self.lru = SlotLRU(slots)
        self._cv = threading.Condition()
        self._stats = {"hits": 0, "misses": 0, "refit_seconds": 0.0}

    @classmethod
    def from_config(cls, cfg):
        from liedeploy.exporters.tensorrt import require_tensorrt

        require_tensorrt()  # one sentence, exit 1, when TensorRT or CUDA is absent
        engine = cfg.model_kwargs.get("engine") if isinstance(cfg.model_kwargs, dict) else None
        engine = engine or (os.path.splitext(cfg.weights)[0] + ".engine" if cfg.weights else None)
        if not engine or not os.path.exists(engine):
            raise ConfigError("--backend trt serves an engine built by 'liedeploy export --trt': put it beside the base "
                              "weights as BASE.engine (or pass --model-kwargs '{\"engine\": \"PATH\"}')")
        return cls(engine, cfg.weights, cfg.input_specs(), slots=cfg.trt_slots, max_batch=cfg.max_batch)

    def discover(self, folder: str) -> dict:
        from liedeploy.serving.backend import discover_task_files

        return discover_task_files(folder, self.file_suffix)

    def tasks(self) -> list:
        return list(self._paths)

    def add(self, task: str, path: str) -> None:
        from liedeploy.core.adapter_file import read_adapter

        read_adapter(path)  # refuse unusable files at registration
        self._paths[task] = path

    def remove(self, task: str) -> None:
        self._paths.pop(task)

    def prefetch(self, task: str) -> None:
        slot = self._acquire(task)
        self.lru.release(slot)

    def is_resident(self, task) -> bool:
        return self.lru.slot_of(task) is not None

    def inputs(self) -> list:
        return list(self._inputs)

    def outputs(self, task) -> list:
        from liedeploy.serving.specs import TensorSpec

        r = self.runners[0]
        return [TensorSpec(n, "FP32", (-1,) + tuple(r.engine.get_tensor_shape(n))[1:]) for n in r.outputs]

    def _acquire(self, task) -> int:
        import time

        with self._cv:
            while True:
                got = self.lru.acquire(task)
                if got is not None:
                    break
                self._cv.wait(0.01)
        slot, refit = got
        if refit:
            t0 = time.perf_counter()
            try:
                self.switchers[slot].activate(None if task is None else self._paths[task])
            except Exception:
                with self._cv:
                    self.lru.loaded[slot] = False
                    self.lru.release(slot)
                raise
            self._stats["misses"] += 1
            self._stats["refit_seconds"] += time.perf_counter() - t0
        else:
            self._stats["hits"] += 1
        return slot

    def run(self, task, inputs: dict) -> dict:
        slot = self._acquire(task)
        try:
            with self.switchers[slot].lock:
                return self.runners[slot](inputs)
        finally:
            with self._cv:
                self.lru.release(slot)
                self._cv.notify_all()

    def run_mixed(self, tasks, inputs: dict) -> dict:
        from liedeploy.serving.backend import run_mixed_by_task

        return run_mixed_by_task(self.run, tasks, inputs)

    def stats(self) -> dict:
        return {"registered": len(self._paths), "resident": len(self.lru.resident()), "resident_bytes": 0,
                "hits": self._stats["hits"], "misses": self._stats["misses"], "evictions": max(0, self.lru.refits - self.lru.k),
                "loads": self.lru.refits, "load_seconds": self._stats["refit_seconds"]}
