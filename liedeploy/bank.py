"""``AdapterBank``: one base model in memory, many tasks, folded on demand, race-free by construction.

A Lie update is dense, so a task's weights are folded once (W * exp(dW), from the pristine base) and
cached. Each cached task is a shallow replica of the module tree that shares every unadapted tensor
with the base and holds only its own folded tensors: memory per task = the adapted tensors, and
concurrent calls for different tasks never see each other's weights (there is no global switch).
The cache is an LRU bounded in bytes. The storage of an evicted task is recycled for the next
fold (no fresh pages to fault in) once no running call uses it; tensors of a replica handed out
by ``model_for`` are never recycled, and nothing is ever written into a tensor in use.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .adapt import adapted_names
from .adapter_file import AdapterFile, check_against_base, read_adapter
from .algebra import check_finite, fold_sum
from .errors import LieError
from .safetensors_io import tensor_sha256

__all__ = ["AdapterBank"]


def _clone_tree(module: nn.Module, memo: dict) -> nn.Module:
    """A new module tree whose modules are shallow copies: every tensor is shared, not copied."""
    if id(module) in memo:
        return memo[id(module)]
    clone = copy.copy(module)  # a new object with a shallow copy of __dict__
    memo[id(module)] = clone
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {k: (None if m is None else _clone_tree(m, memo)) for k, m in module._modules.items()}
    return clone


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


class _Folded:
    """One build of a task: its replica and folded tensors, and who is using them."""

    __slots__ = ("replica", "tensors", "users", "leaked", "retired")

    def __init__(self, replica: nn.Module, tensors: dict):
        self.replica, self.tensors = replica, tensors
        self.users = 0
        self.leaked = False  # handed out by model_for(): never recycled
        self.retired = False  # evicted or removed: recycled once no call uses it


class _Task:
    __slots__ = ("adapter", "folded", "nbytes")

    def __init__(self, adapter: AdapterFile):
        self.adapter = adapter
        self.folded: Optional[_Folded] = None
        self.nbytes = 0


class AdapterBank:
    """Serve many Lie adapters over one base model.

    Args:
        model: the base architecture with pristine base weights (no live adapters).
        adapters: ``{task name: adapter file path}`` to add now.
        cache_bytes: bound of the folded-weights cache (default: unbounded).
        device: where the base and the folded weights live (default: the model's device).
        verify_base: refuse adapters whose ``base_sha256`` does not match the model.

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
    ):
        if adapted_names(model) or getattr(model, "_lie_merged", None):
            raise LieError("AdapterBank needs the plain base model: call remove_adapters_ or unmerge_ first")
        if cache_bytes is not None and cache_bytes < 0:
            raise LieError(f"cache_bytes must be >= 0, got {cache_bytes}")
        if device is not None:
            model = model.to(device)
        self.base = model.eval()
        self.cache_bytes = cache_bytes
        self.verify_base = verify_base
        self._tensors = dict(self.base.state_dict(keep_vars=True))
        self._hashes: dict = {}
        self._tasks: dict[str, _Task] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        self._pool: dict = {}  # (shape, dtype, device) -> free folded tensors for reuse
        self._pool_bytes = 0
        self._pool_limit = 0
        self._build_locks: dict[str, threading.Lock] = {}
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "recycled": 0}
        for name, path in (adapters or {}).items():
            self.add(name, path)

    # -- adapters ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def _hash(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = tensor_sha256(self._tensors[name])
        return self._hashes[name]

    def add(self, name: str, adapter: Union[str, AdapterFile], *, replace: bool = False) -> None:
        """Add (or with ``replace=True`` reload) a task; refused if made for another base."""
        af = adapter if isinstance(adapter, AdapterFile) else read_adapter(os.fspath(adapter))
        check_against_base(
            af, {k: tuple(v.shape) for k, v in self._tensors.items()}, self._hash if self.verify_base else None
        )
        with self._lock:
            if name in self._tasks and not replace:
                raise LieError(f"task {name!r} is already in the bank; pass replace=True to reload it")
            self._drop(name)
            self._tasks[name] = _Task(af)
            self._build_locks.setdefault(name, threading.Lock())

    def remove(self, name: str) -> None:
        """Remove a task and free its cached weights."""
        with self._lock:
            self._check(name)
            self._drop(name)
            del self._tasks[name]

    def _drop(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is not None and task.folded is not None:
            self._lru.pop(name, None)
            self._retire(task.folded)
            task.folded, task.nbytes = None, 0

    def _retire(self, folded: "_Folded") -> None:
        folded.retired = True
        if folded.users == 0 and not folded.leaked:
            self._recycle(folded)

    def _recycle(self, folded: "_Folded") -> None:
        """Keep the storage of a build nobody uses for the next fold (bounded: one task's bytes)."""
        for t in folded.tensors.values():
            nbytes = t.numel() * t.element_size()
            if self._pool_bytes + nbytes > self._pool_limit:
                break
            self._pool.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
            self._pool_bytes += nbytes
        folded.tensors = {}
        folded.replica = None

    def _check(self, name: str) -> _Task:
        task = self._tasks.get(name)
        if task is None:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise LieError(f"unknown task {name!r}; known tasks: {known}")
        return task

    # -- cache ------------------------------------------------------------------------------
    @property
    def cached_bytes(self) -> int:
        return sum(self._tasks[n].nbytes for n in self._lru)

    def _evict_for(self, need: int) -> None:
        if self.cache_bytes is None:
            return
        while self._lru and self.cached_bytes + need > self.cache_bytes:
            old, _ = self._lru.popitem(last=False)
            task = self._tasks[old]
            self._retire(task.folded)
            task.folded, task.nbytes = None, 0
            self.stats["evictions"] += 1

    def _take(self, W: torch.Tensor) -> Optional[torch.Tensor]:
        with self._lock:
            free = self._pool.get((tuple(W.shape), W.dtype, W.device))
            if free:
                t = free.pop()
                self._pool_bytes -= t.numel() * t.element_size()
                self.stats["recycled"] += 1
                return t
        return None

    def _fold(self, af: AdapterFile) -> tuple[dict, int]:
        folded, nbytes = {}, 0
        for n in af.targets:
            W = self._tensors[n].detach()
            B, A = af.factors[n]
            ok: list = []
            f = fold_sum(W, [(B, A, af.targets[n]["scale"])], af.expmap, out=self._take(W), check=ok)
            check_finite(n, f, B, A, af.targets[n]["scale"], ok=ok[0], W=W)
            folded[n] = f
            nbytes += f.numel() * f.element_size()
        return folded, nbytes

    def _replica(self, folded: dict) -> nn.Module:
        replica = _clone_tree(self.base, {})  # new module objects, the very same tensors
        for n, f in folded.items():
            mod, attr = _split(n)
            owner = replica.get_submodule(mod) if mod else replica
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(f, requires_grad=False)
            else:
                owner._buffers[attr] = f
        return replica

    def _acquire(self, task: str) -> "_Folded":
        """The task's build with one more user (folded and cached on first use)."""
        with self._lock:
            t = self._check(task)
            if t.folded is not None:
                self._lru.move_to_end(task)
                self.stats["hits"] += 1
                t.folded.users += 1
                return t.folded
            lock = self._build_locks[task]
        with lock:  # one build per task; other tasks proceed
            with self._lock:
                t = self._check(task)
                if t.folded is not None:
                    self.stats["hits"] += 1
                    t.folded.users += 1
                    return t.folded
            tensors, nbytes = self._fold(t.adapter)
            folded = _Folded(self._replica(tensors), tensors)
            with self._lock:
                self._pool_limit = max(self._pool_limit, nbytes)
                folded.users += 1
                if self._tasks.get(task) is not t:  # removed or reloaded meanwhile: use once
                    folded.retired = True
                    return folded
                self._evict_for(nbytes)
                self.stats["misses"] += 1
                if self.cache_bytes is None or nbytes <= self.cache_bytes:
                    t.folded, t.nbytes = folded, nbytes
                    self._lru[task] = None
                    self._lru.move_to_end(task)
                else:
                    folded.retired = True  # larger than the whole cache: use once
            return folded

    def _release(self, folded: "_Folded") -> None:
        with self._lock:
            folded.users -= 1
            if folded.retired and folded.users == 0 and not folded.leaked:
                self._recycle(folded)

    def prefetch(self, task: str) -> None:
        """Fold and cache ``task`` now (e.g. before traffic arrives), evicting as the bound requires."""
        self._release(self._acquire(task))

    def model_for(self, task: Optional[str]) -> nn.Module:
        """The module that computes ``task`` (the base for ``None``), to hold and call directly.

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

    def forward_mixed(self, x: torch.Tensor, tasks: Sequence[Optional[str]]) -> Any:
        """One task name per sample: groups samples by task, runs each group, returns input order.

        Works for any output made of tensors with the batch as first axis (a tensor, tuples, dicts,
        transformers ModelOutputs).
        """
        if len(tasks) != len(x):
            raise LieError(f"forward_mixed got {len(tasks)} task names for a batch of {len(x)}")
        groups: dict = {}
        for i, t in enumerate(tasks):
            groups.setdefault(t, []).append(i)
        for t in groups:
            if t is not None:
                self._check(t)
        from torch.utils import _pytree as pytree

        leaves_out, spec = None, None
        for t, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            leaves, spec = pytree.tree_flatten(self(x.index_select(0, index), task=t))
            if not all(isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == len(idx) for v in leaves):
                raise LieError("forward_mixed needs outputs whose tensors all have the batch as first axis")
            if leaves_out is None:
                leaves_out = [v.new_empty((len(x),) + tuple(v.shape[1:])) for v in leaves]
            for o, v in zip(leaves_out, leaves):
                o.index_copy_(0, index, v)
        return pytree.tree_unflatten(leaves_out, spec)
