"""One forward over rows of several tasks: a view of the base whose task-specific modules dispatch
row segments to each task's own module.

Tasks differ only in the modules whose tensors they fold or replace (an adapted ``q_proj``, a
replaced head); everything else (norms, attention arithmetic, rotary tables, the KV cache
bookkeeping) is shared. :class:`MixedView` is a replica of the base (shared tensors, shallow module
copies) in which each module that differs in any of the given tasks' replicas is a
:class:`RowDispatch`: rows ``[a, b)`` of its input go through task ``t``'s module (its own
``forward``, so every option of the layer keeps working), and the outputs are concatenated. Rows
must be grouped by task, in the order :meth:`MixedView.set_rows` is given.

A path that is a plain ``nn.Linear`` (float32, float16 or bfloat16) in every task, fed 2+ segments
of at most ``liedeploy.core.native.rows_max(dtype)`` rows each (16 in float32, 8 in half precision)
on CPU (a decode step), runs all segments in one call of the row-segment kernel
(``rows_kernel.c``), which streams each task's weight once; its rows agree with the task's own
``Linear`` to float32 rounding of the sum (summed in another order, then rounded once to the
model's dtype), not bit for bit.
``LIEDEPLOY_ROWS=blas`` keeps one call of the task's module per segment.

A module whose input does not have the rows as its first axis (a layer that flattens batch and
sequence together, as mixture-of-experts routers do) raises :class:`NotRowwise`; callers fall back
to one forward per task.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional, Sequence

import torch
from torch import nn

from liedeploy.bank.replica import clone_tree

__all__ = ["MixedView", "RowDispatch", "NotRowwise", "differing_modules", "rows_path"]


_PATHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # replica -> differing_modules(base, replica)


def rows_path(device) -> tuple:
    """``(path, why)``: how a mixed step's Linear layers run on ``device`` (for start-up lines):
    ``"row-segment kernel"`` or ``"one call per task"``, with the reason."""
    from liedeploy.core import native

    if os.environ.get("LIEDEPLOY_ROWS", "auto") == "blas":
        return "one call per task", "LIEDEPLOY_ROWS=blas"
    if torch.device(device).type != "cpu":
        return "one call per task", f"the kernel is for CPU, the model is on {torch.device(device).type}"
    if not native.available():
        return "one call per task", native.status()
    return "row-segment kernel", (f"plain Linear layers of 2+ tasks, up to {native.ROWS_MAX} rows per task in float32 "
                                  f"and {native.ROWS_MAX_HALF} in float16/bfloat16")


class NotRowwise(RuntimeError):
    """A task-specific module got an input whose first axis is not the batch rows."""


def _own_tensors(module: nn.Module) -> list:
    return [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]


def differing_modules(base: nn.Module, replica: nn.Module) -> list:
    """Paths of the modules of ``replica`` whose own tensors are not the base's (by identity)."""
    base_modules = dict(base.named_modules(remove_duplicate=False))
    out = []
    for path, mod in replica.named_modules(remove_duplicate=False):
        ref = base_modules.get(path)
        if ref is None:
            continue
        mine, theirs = _own_tensors(mod), _own_tensors(ref)
        if len(mine) != len(theirs) or any(a is not b for a, b in zip(mine, theirs)):
            out.append(path)
    return sorted(set(out))


class RowDispatch(nn.Module):
    """Runs row segments of its input through each task's module at one path (see module docs)."""

    def __init__(self, path: str, view: "MixedView", like: nn.Module):
        super().__init__()
        self.path = path
        self._view = [view]  # lists: not registered submodules (no cycle in the module tree)
        self._like = [like]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the model reads off the layer (weight.dtype, in_features...)
            return getattr(self.__dict__["_like"][0], name)

    def forward(self, x, *args, **kwargs):
        view = self._view[0]
        segments = view.segments
        if not torch.is_tensor(x) or x.shape[0] != view.rows:
            raise NotRowwise(f"{self.path} takes an input whose first axis is not the {view.rows} batch rows")
        if (len(segments) > 1 and not args and not kwargs and view.linear_paths.get(self.path)
                and not torch.is_grad_enabled()):  # the kernel records no autograd graph
            out = self._rows_linear(view, x)
            if out is not None:
                return out
        if len(segments) == 1:
            return view.modules[segments[0][2]][self.path](x, *args, **kwargs)
        outs = [view.modules[key][self.path](x[a:b], *args, **kwargs) for a, b, key in segments]
        return torch.cat(outs, 0)

    def _rows_linear(self, view: "MixedView", x: torch.Tensor) -> Optional[torch.Tensor]:
        """Every segment through its task's plain ``nn.Linear`` in one call of the CPU row-segment
        kernel, where each segment has few rows (a decode step of several tasks: each task's weight
        is streamed once, at 1.7-2.9x the speed of one BLAS call per task, ``benchmarks/bench_rows.py``);
        ``None``: not this case (one task alone keeps BLAS, faster on weights that stay in cache)."""
        from liedeploy.core import native

        per_row = x[0].numel() // x.shape[-1] if x.dim() > 1 and x.shape[-1] else 0
        mods = [view.modules[key][self.path] for _, _, key in view.segments]
        if not per_row or view.max_rows * per_row > native.rows_max(mods[0].weight.dtype):
            return None
        weights = [m.weight for m in mods]
        biases = [m.bias for m in mods]
        x2 = x.reshape(-1, x.shape[-1])
        if not native.rows_supported(x2, weights, biases):
            return None
        starts = view.starts if per_row == 1 else view.starts * per_row
        return native.rows_linear(x2, starts, weights, biases).reshape(*x.shape[:-1], weights[0].shape[0])


class MixedView:
    """A callable replica of ``base`` running rows of several tasks in one forward.

    Args:
        base: the base model (shared tensors).
        replicas: ``{task: replica}`` (``None`` for the base is allowed: its modules are the base's).
    """

    def __init__(self, base: nn.Module, replicas: dict):
        self.base = base
        paths = set()
        for replica in replicas.values():
            if replica is not base:
                found = _PATHS.get(replica)
                if found is None:  # a replica's differing modules never change: found once per replica
                    found = _PATHS[replica] = differing_modules(base, replica)
                paths.update(found)
        # a path inside another differing path is run by the outer one
        self.paths = sorted(p for p in paths if not any(p != q and p.startswith(q + ".") for q in paths))
        self.modules = {task: {p: (replica.get_submodule(p) if p else replica) for p in self.paths}
                        for task, replica in replicas.items()}
        self.model = clone_tree(base)
        for p in self.paths:
            if not p:
                raise NotRowwise("the tasks replace the model's own tensors at its root")
            parent, _, name = p.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            owner._modules[name] = RowDispatch(p, self, base.get_submodule(p))
        # paths whose module is a plain nn.Linear in every task: the row-segment kernel may run them
        # (LIEDEPLOY_ROWS=blas: never, one call per task)
        kernel = os.environ.get("LIEDEPLOY_ROWS", "auto") != "blas"
        self.linear_paths = {p: kernel and all(type(m[p]) is nn.Linear for m in self.modules.values())
                             for p in self.paths}
        self.segments: list = []
        self.rows = 0
        self.max_rows = 0
        self.starts = torch.zeros(1, dtype=torch.int64)

    def set_rows(self, tasks: Sequence[Optional[str]]) -> None:
        """The task of each row, rows of one task together (``[a, a, b, None, None]``)."""
        segments, start = [], 0
        for i in range(1, len(tasks) + 1):
            if i == len(tasks) or tasks[i] != tasks[start]:
                segments.append((start, i, tasks[start]))
                start = i
        if len({s[2] for s in segments}) != len(segments):
            raise ValueError("rows of one task must be together")
        self.segments, self.rows = segments, len(tasks)
        self.max_rows = max((b - a for a, b, _ in segments), default=0)
        self.starts = torch.tensor([0] + [b for _, b, _ in segments], dtype=torch.int64)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)
