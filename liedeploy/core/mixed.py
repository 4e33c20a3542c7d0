"""Mixed-task batches, one copy for the bank, the serving backends and the ONNX Runtime bank:
samples grouped by task, each group run on its own, outputs scattered back to input order.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from liedeploy.errors import LieError

__all__ = ["group_by_task", "run_mixed"]


def group_by_task(tasks: Sequence[Optional[str]]) -> dict:
    """``{task: [sample indices]}`` in order of first appearance."""
    groups: dict = {}
    for i, t in enumerate(tasks):
        groups.setdefault(t, []).append(i)
    return groups


def _empty_like(v, n: int):
    if hasattr(v, "new_empty"):  # torch
        return v.new_empty((n,) + tuple(v.shape[1:]))
    import numpy as np

    return np.empty((n,) + tuple(v.shape[1:]), dtype=v.dtype)


def run_mixed(run: Callable[[Optional[str], Any], Any], tasks: Sequence[Optional[str]], n: int,
              take: Callable[[list], Any]) -> Any:
    """Outputs of a batch whose samples each name their task, in input order.

    Args:
        run: ``run(task, inputs) -> output`` for a batch of one task; the output is a tensor or
            array, or a tuple/list/dict/ModelOutput of them, each with the batch as first axis.
        tasks: one task name per sample (``None``: the base).
        n: the batch size (``len(tasks)``).
        take: ``take(indices) -> inputs`` of those samples.

    Raises:
        LieError: tasks that do not match the batch, outputs without the batch as first axis, or
            tasks whose outputs have other shapes per sample (a head of their own).
    """
    from torch.utils import _pytree as pytree

    if len(tasks) != n:
        raise LieError(f"forward_mixed got {len(tasks)} task names for a batch of {n}")
    leaves_out, spec = None, None
    for t, idx in group_by_task(tasks).items():
        leaves, spec = pytree.tree_flatten(run(t, take(idx)))
        if not all(hasattr(v, "shape") and len(v.shape) > 0 and v.shape[0] == len(idx) for v in leaves):
            raise LieError("forward_mixed needs outputs whose tensors all have the batch as first axis")
        if leaves_out is None:
            leaves_out = [_empty_like(v, n) for v in leaves]
        for o, v in zip(leaves_out, leaves):
            if tuple(o.shape[1:]) != tuple(v.shape[1:]):
                raise LieError(f"task {t!r} gives outputs of shape {list(v.shape[1:])} per sample and another task "
                               f"in the batch {list(o.shape[1:])}: tasks with other heads cannot share a mixed batch")
            if hasattr(o, "index_copy_"):
                import torch

                o.index_copy_(0, torch.tensor(idx, device=o.device), v)
            else:
                o[idx] = v
    return pytree.tree_unflatten(leaves_out, spec)
