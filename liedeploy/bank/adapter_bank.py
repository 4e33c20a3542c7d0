"""``AdapterBank``: one base model in memory, many tasks, folded on demand, race-free by construction.

A Lie update is dense, so a task's weights are folded once (W * exp(dW), from the pristine base) and
cached. Each cached task is a replica of the module tree (:mod:`liedeploy.replica`) that shares
every unadapted tensor with the base and holds only its own folded tensors (and full tensors of
format "2", such as its own classifier head): memory per task = those tensors, and concurrent
calls for different tasks never see each other's weights (there is no global switch).

The bank composes six parts with one job each: a :class:`~liedeploy.task_registry.TaskRegistry`
(which tasks exist; lazy: headers only until a task is used), a byte-bounded
:class:`~liedeploy.bank.task_cache.TaskCache` (which folded tasks stay: the most used, counted with
decay; a rarely used task is served once rather than evict a popular one), a
:class:`~liedeploy.storage_pool.StoragePool` (evicted storage reused for the next fold once no
running call uses it; tensors of a replica handed out by ``model_for`` are never recycled), the
replica builder, the leases that hold a task's build while a call runs (:mod:`liedeploy.bank.lease`)
and, once :meth:`AdapterBank.pack_convs` is called, the
:class:`~liedeploy.bank.packed_weights.PackedWeights` (Conv2d weights folded into oneDNN's layout).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from liedeploy.core.adapt import adapted_names
from liedeploy.core.state import lie_state
from liedeploy.core.adapter_file import AdapterFile
from liedeploy.core.mixed import run_mixed
from liedeploy.core.algebra import check_finite, fold_sum
from liedeploy.core import conv_pack
from liedeploy.bank.packed_weights import PackedWeights
from liedeploy.bank.task_cache import TaskCache
from liedeploy.errors import LieError
from liedeploy.bank.lease import Folded, TaskLease
from liedeploy.bank.replica import build_replica, refill_replica, replica_key
from liedeploy.io.safetensors_io import DTYPE_NAMES, tensor_sha256
from liedeploy.bank.storage_pool import StoragePool
from liedeploy.bank.task_registry import TaskEntry, TaskRegistry

__all__ = ["AdapterBank", "TaskLease"]


def _takes(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s forward takes the keyword ``name``."""
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


class AdapterBank:
    """Serve many Lie adapters over one base model.

    Args:
        model: the base architecture with pristine base weights (no live adapters).
        adapters: ``{task name: adapter file path}`` to add now.
        cache_bytes: bound of the folded-weights cache (default: unbounded).
        device: where the base and the folded weights live (default: the model's device).
        verify_base: refuse adapters whose ``base_sha256`` does not match the model.
        lazy: register tasks from their headers only; factors are read at the first fold.
        cache_policy: ``"frequency"`` (default: keep the most used tasks, see
            :mod:`liedeploy.bank.task_cache`) or ``"lru"`` (keep the most recently used).

    Example:
        >>> bank = AdapterBank(model, adapters={"cats": "cats.safetensors", "dogs": "dogs.safetensors"})
        >>> y = bank(x, task="cats")
        >>> ys = bank.forward_mixed(xs, tasks=["cats", "dogs", "cats"])
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Optional[Mapping[str, str]] = None,
        *,
        cache_bytes: Optional[int] = None,
        device: Union[None, str, torch.device] = None,
        verify_base: bool = True,
        lazy: bool = False,
        cache_policy: str = "frequency",
    ):
        if adapted_names(model) or lie_state(model) is not None:
            raise LieError("AdapterBank needs the plain base model: call remove_adapters_ or unmerge_ first")
        if cache_bytes is not None and cache_bytes < 0:
            raise LieError(f"cache_bytes must be >= 0, got {cache_bytes}")
        if device is not None:
            model = model.to(device)
        self.base = model.eval()
        self.verify_base = verify_base
        self.lazy = lazy
        self._tensors = dict(self.base.state_dict(keep_vars=True))
        self._spare_replicas: dict = {}  # _spare_key of replaced tensors -> a recycled replica for them
        self._absmax: dict = {}  # name -> (tensor version, max|W|): lets a fold skip its finiteness scan
        self._hashes: dict = {}
        self._packed = PackedWeights()  # Conv2d weights folded straight into oneDNN's layout (pack_convs)
        self._lock = threading.RLock()
        self.registry = TaskRegistry({k: tuple(v.shape) for k, v in self._tensors.items()},
                                     self._hash if verify_base else None,
                                     {k: DTYPE_NAMES[v.dtype] for k, v in self._tensors.items() if v.dtype in DTYPE_NAMES})
        try:
            self.cache = TaskCache(cache_bytes, policy=cache_policy)
        except ValueError as exc:
            raise LieError(str(exc)) from None
        self.pool = StoragePool()
        self._folded: dict[str, Folded] = {}
        self._build_locks: dict[str, threading.Lock] = {}
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "recycled": 0, "folds": 0, "fold_seconds": 0.0,
                      "not_kept": 0}
        for name, path in (adapters or {}).items():
            self.add(name, path)

    # -- tasks ------------------------------------------------------------------------------
    @property
    def cache_bytes(self) -> Optional[int]:
        return self.cache.limit

    @property
    def tasks(self) -> list[str]:
        return self.registry.names

    def _hash(self, name: str) -> str:
        h = self._hashes.get(name)
        if h is None:
            h = self._hashes[name] = tensor_sha256(self._tensors[name])
        return h

    def add(self, name: str, adapter: Union[str, AdapterFile], *, replace: bool = False,
            lazy: Optional[bool] = None) -> None:
        """Add (or with ``replace=True`` reload) a task; refused if made for another base."""
        if not isinstance(adapter, AdapterFile):
            adapter = os.fspath(adapter)
        entry = self.registry.read(name, adapter, lazy=self.lazy if lazy is None else lazy)
        with self._lock:
            self.registry.put(entry, replace=replace)
            self._drop(name)
            self._build_locks.setdefault(name, threading.Lock())

    def remove(self, name: str) -> None:
        """Remove a task and free its cached weights."""
        with self._lock:
            self.registry.pop(name)
            self._drop(name)

    def is_resident(self, name: str) -> bool:
        """Whether ``name`` is folded and cached (a call for it will not fold)."""
        return name in self._folded

    @property
    def resident(self) -> list:
        """Folded tasks, least recently used first."""
        with self._lock:
            return self.cache.keys()

    @property
    def cached_bytes(self) -> int:
        return self.cache.total

    def _drop(self, name: str) -> None:
        folded = self._folded.pop(name, None)
        if folded is not None:
            self.cache.pop(name)
            self._retire(folded)

    def _retire(self, folded: Folded) -> None:
        folded.retired = True
        if folded.users == 0 and not folded.leaked:
            self._recycle(folded)

    def _recycle(self, folded: Folded) -> None:
        self.pool.give(folded.recyclable)
        self.stats["recycled"] = self.pool.reused
        if folded.replica is not None and folded.tensors:  # its module tree serves the next fold of these names
            self._spare_replicas[replica_key(folded.tensors)] = folded.replica
        folded.tensors, folded.recyclable, folded.replica = {}, [], None

    # -- folding ----------------------------------------------------------------------------
    def _take(self, W: torch.Tensor) -> Optional[torch.Tensor]:
        with self._lock:
            t = self.pool.take(W)
            self.stats["recycled"] = self.pool.reused
            return t

    def _fold(self, entry: TaskEntry) -> Folded:
        # outside inference mode even when called inside it: the folded tensors go back to the
        # storage pool, and an inference tensor there could not be folded into again later
        with torch.inference_mode(False), torch.no_grad():
            return self._fold_tensors(entry)

    def _w_absmax(self, name: str, W: torch.Tensor) -> float:
        """max|W| of a base tensor, computed once per version of the tensor."""
        hit = self._absmax.get(name)
        if hit is not None and hit[0] == W._version:
            return hit[1]
        value = float(W.abs().amax()) if W.numel() else 0.0
        self._absmax[name] = (W._version, value)
        return value

    def _fold_tensors(self, entry: TaskEntry) -> Folded:
        af = entry.adapter()
        tensors, recyclable, nbytes = {}, [], 0
        packed = [n for n in af.targets if n in self._packed.plans]  # folded together below
        for n in af.targets:
            if n in self._packed.plans:
                continue
            W = self._tensors[n].detach()
            B, A = af.factors[n]
            ok: list = []
            f = fold_sum(W, [(B, A, af.targets[n]["scale"])], af.expmap, out=self._take(W), check=ok,
                         w_absmax=self._w_absmax(n, W))
            check_finite(n, f, B, A, af.targets[n]["scale"], ok=ok[0], W=W)
            tensors[n] = f
            recyclable.append(f)
        device = next(iter(self._tensors.values())).device if self._tensors else torch.device("cpu")
        full = {}
        for n, t in af.full.items():
            like = self._tensors.get(n)
            full[n] = t.to(device=like.device if like is not None else device,
                           dtype=like.dtype if like is not None and like.is_floating_point() else t.dtype)
        if packed:
            folded = self._packed.fold(af, packed, self._take, self._tensors, {**tensors, **full})
            tensors.update(folded)
            recyclable.extend(folded.values())
        tensors.update(full)
        tensors.update(self._packed.own_layers(tensors, self._tensors))  # a fused graph: the task's own norms
        nbytes = sum(conv_pack.nbytes(t) for t in tensors.values())
        shared = self._packed.shared(tensors)  # not counted: held once for every task
        tensors.update(shared)
        with self._lock:
            spare = self._spare_replicas.pop(replica_key(tensors), None)
        if self._packed.graph is not None:
            replica = self._packed.replica(tensors, self._tensors, spare)
        elif spare is None:
            replica = build_replica(self.base, tensors)
            conv_pack.adopt(replica, packed + list(shared))
        else:  # built for the same names, packed the same way: its packed layers run packed already
            replica = refill_replica(spare, tensors)
        return Folded(replica, tensors, recyclable, nbytes)

    # -- packed convolution weights -------------------------------------------------------------
    def pack_convs(self, run, batches=(1, 16)) -> list:
        """Fold the Conv2d weights of every task from now on straight into oneDNN's blocked layout,
        so that the tasks' convolutions skip oneDNN's reorder of the weight on every call (see
        :mod:`liedeploy.core.conv_pack`: on CPU, float32, layers whose layout is the same for every
        batch size in ``batches``). ``run(model)`` calls a model once on an example input with the
        shapes that will be served. Results match the dense path up to float32 rounding. A task's
        replica runs the packed layers it does not adapt on a packed copy of the base's weights,
        shared by every task (held once, outside ``cache_bytes``). Tasks folded before are dropped
        (folded again, packed, at their next use); the base (``task=None``) keeps its dense weights.
        Where ``torch.export`` captures the forward, every task then runs as one fused graph
        (:mod:`liedeploy.core.conv_graph`: batch norms folded into the packed convolutions, ReLU
        and residual adds as oneDNN post-ops; :attr:`fusion` says what was fused, or why not).
        Call it before serving. Returns the packed weights' names (empty where
        :func:`~liedeploy.core.conv_pack.pack_status` is not ``"ready"``, no layer qualifies, or the
        model fails with packed weights: :attr:`fusion` says why).
        """
        if conv_pack.pack_status() != "ready":
            return []
        with self._lock:
            names = self._packed.plan(self.base, self._tensors, run, batches)
            for name in list(self._folded):
                self.cache.pop(name)
                self._retire(self._folded.pop(name))
            self._spare_replicas.clear()
            self.pool = StoragePool()
        return names

    @property
    def packed(self) -> list:
        """Names of the weights folded into oneDNN's blocked layout (:meth:`pack_convs`)."""
        return sorted(self._packed.plans)

    @property
    def fusion(self) -> str:
        """How the replicas of packed tasks run, in one line: as one captured graph with batch norms,
        ReLUs and residual adds fused into the packed convolutions (:mod:`liedeploy.core.conv_graph`),
        or as module trees, and why; where :meth:`pack_convs` packed nothing, why not."""
        if self._packed.graph is not None:
            return self._packed.graph.describe()
        if not self._packed.plans:
            return self._packed.reason
        return f"modules ({self._packed.reason})"

    def _acquire(self, task: str, uses: int = 1, keep: bool = False) -> Folded:
        """The task's build with one more user (folded on first use, and cached when the cache
        admits it or ``keep``); ``uses`` uses of the task are counted."""
        with self._lock:
            entry = self.registry.get(task)
            self.cache.record(task, uses)
            folded = self._folded.get(task)
            if folded is not None:
                self.cache.touch(task)
                self.stats["hits"] += 1
                folded.users += 1
                return folded
            lock = self._build_locks[task]
        with lock:  # one build per task; other tasks proceed
            with self._lock:
                entry = self.registry.get(task)
                folded = self._folded.get(task)
                if folded is not None:
                    self.stats["hits"] += 1
                    folded.users += 1
                    return folded
            t0 = time.perf_counter()
            folded = self._fold(entry)
            seconds = time.perf_counter() - t0
            with self._lock:
                self.stats["folds"] += 1
                self.stats["fold_seconds"] += seconds
                self.pool.allow(folded.nbytes)
                folded.users += 1
                if task not in self.registry or self.registry.get(task) is not entry:  # removed meanwhile: use once
                    folded.retired = True
                    return folded
                self.stats["misses"] += 1
                if not self.cache.fits(folded.nbytes):
                    folded.retired = True  # larger than the whole cache: use once
                    return folded
                victims = self.cache.victims(task, folded.nbytes, force=keep)
                if victims is None:  # used less than what it would evict: serve it once, keep the others
                    folded.retired = True
                    self.stats["not_kept"] += 1
                    return folded
                for old in victims:
                    self.cache.pop(old)
                    self._retire(self._folded.pop(old))
                    self.stats["evictions"] += 1
                self.cache.put(task, folded.nbytes)
                self._folded[task] = folded
            return folded

    def _release(self, folded: Folded) -> None:
        with self._lock:
            folded.users -= 1
            if folded.retired and folded.users == 0 and not folded.leaked:
                self._recycle(folded)

    def prefetch(self, task: str) -> None:
        """Fold and cache ``task`` now (e.g. before traffic arrives), evicting as the bound requires
        (the least used tasks first, even if they are used more than ``task``)."""
        self._release(self._acquire(task, uses=0, keep=True))

    def note_uses(self, task: str, uses: int = 1) -> None:
        """Count ``uses`` uses of ``task`` that ran on a module already held (for the cache's choice)."""
        with self._lock:
            self.cache.record(task, uses)

    def lease(self, task: Optional[str], uses: int = 1) -> "TaskLease":
        """Hold ``task``'s module (``lease.model``) until ``lease.release()`` (or the ``with`` block ends).

        Unlike :meth:`model_for`, the storage of a released lease goes back to the bank: once the
        task is evicted and no lease or call uses it, the next fold reuses it, so a server that
        holds tasks only while it computes them stays within ``cache_bytes`` plus what it holds.

        Example:
            >>> with bank.lease("cats") as held:
            ...     y = held.model(x)
        """
        if task is None:
            return TaskLease(None, None, self.base, self._release, self.note_uses)
        folded = self._acquire(task, uses)
        return TaskLease(task, folded, folded.replica, self._release, self.note_uses)

    def model_for(self, task: Optional[str]) -> nn.Module:
        """The module that computes ``task`` (the base for ``None``), to hold and call directly
        (after :meth:`pack_convs` with a fused graph, a
        :class:`~liedeploy.core.conv_graph.GraphReplica`: the graph and the task's tensors).

        Its tensors are never recycled, even after eviction (they stay alive while you hold it).
        """
        if task is None:
            return self.base
        folded = self._acquire(task)
        with self._lock:
            folded.leaked = True
        self._release(folded)
        return folded.replica

    # -- inference --------------------------------------------------------------------------
    def __call__(self, *args: Any, task: Optional[str] = None, **kwargs: Any) -> Any:
        """Run the model with ``task``'s folded weights (``task=None``: the base)."""
        with torch.no_grad():
            if task is None:
                return self.base(*args, **kwargs)
            folded = self._acquire(task)
            try:
                return folded.replica(*args, **kwargs)
            finally:
                self._release(folded)

    def forward_mixed(self, x: Optional[torch.Tensor] = None, tasks: Sequence[Optional[str]] = (), **inputs: Any) -> Any:
        """One task name per sample: groups samples by task, runs each group, returns input order.

        Inputs are positional (``x``) and/or keyword (``input_ids=..., attention_mask=...``); every
        tensor input has the batch as first axis. Works for any output made of tensors with the batch
        as first axis (a tensor, tuples, dicts, transformers ModelOutputs) whose shapes agree between
        the tasks in the batch. A model that takes ``use_cache`` (a causal LM) is run with
        ``use_cache=False`` unless told otherwise: a KV cache is not a per-sample tensor.

        Example:
            >>> logits = bank.forward_mixed(tasks=["a", "b"], input_ids=ids, attention_mask=mask).logits
        """
        batch = [v for v in ([x] if x is not None else []) + list(inputs.values()) if isinstance(v, torch.Tensor)]
        if not batch:
            raise LieError("forward_mixed needs inputs: a tensor, or keyword tensors such as input_ids=...")
        n = len(batch[0])
        for t in set(tasks):
            if t is not None:
                self.registry.get(t)  # unknown tasks refused before anything runs
        if "use_cache" not in inputs and _takes(self.base, "use_cache"):
            inputs = {**inputs, "use_cache": False}

        def pick(v, index):
            return v.index_select(0, index) if isinstance(v, torch.Tensor) and v.dim() and len(v) == n else v

        def take(idx):
            index = torch.tensor(idx, device=batch[0].device)
            return (pick(x, index) if x is not None else None), {k: pick(v, index) for k, v in inputs.items()}

        def run(t, args):
            xs, kw = args
            rows = len(xs) if xs is not None else next(
                (len(v) for v in kw.values() if isinstance(v, torch.Tensor) and v.dim()), 1)
            with torch.no_grad(), self.lease(t, uses=rows) as held:  # each sample is a use of its task
                return held.model(xs, **kw) if xs is not None else held.model(**kw)

        return run_mixed(run, tasks, n, take)
