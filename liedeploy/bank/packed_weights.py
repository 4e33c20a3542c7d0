"""A bank's packed Conv2d weights: which layers, the base in oneDNN's layout, a task's fold into it.

:meth:`liedeploy.AdapterBank.pack_convs` fills it; the bank's folds then go through :meth:`fold`
for the layers it names (every packed layer of a task in one kernel call) and give each replica
the base's packed copy of the layers the task leaves alone (:meth:`shared`). See
:mod:`liedeploy.core.conv_pack` for the layouts and the kernel.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from liedeploy.core import conv_pack
from liedeploy.core.adapter_file import AdapterFile
from liedeploy.core.algebra import check_finite, compute_dtype

__all__ = ["PackedWeights"]


class PackedWeights:
    """``plans`` (weight name -> :class:`~liedeploy.core.conv_pack.ConvPlan`) and ``base`` (weight
    name -> the base weight packed so); empty until :meth:`plan`. Not thread safe: the bank holds its
    lock around :meth:`plan`; the rest only reads."""

    def __init__(self):
        self.plans: dict = {}
        self.base: dict = {}

    def plan(self, model: torch.nn.Module, tensors: dict, run: Callable, batches) -> list:
        """Plan and pack ``model``'s Conv2d weights (``tensors``: its state by name); the names packed."""
        plans = {n: p for n, p in conv_pack.plan_convs(model, run, batches).items() if n in tensors}
        base = {n: p.pack(tensors[n]) for n, p in plans.items()}
        self.plans, self.base = plans, base  # both or neither
        return sorted(plans)

    def fold(self, af: AdapterFile, names: list, take: Callable[[torch.Tensor], Optional[torch.Tensor]],
             dense: dict) -> dict:
        """``{name: packed folded weight}`` for the packed ``names`` a task adapts, in one kernel call,
        written into storage from ``take`` (a pool) or a new copy of the packed base; a non-finite
        result is refused by name as the dense path does (``dense``: the base's dense tensors)."""
        layers = []
        for n in names:
            base = self.base[n]
            out = take(base)
            B, A = af.factors[n]
            cdt = compute_dtype(base.dtype)
            layers.append((self.plans[n], base, base.clone() if out is None else out,
                           B.to(dtype=cdt) * af.targets[n]["scale"], A.to(dtype=cdt)))
        finite = conv_pack.fold_packed(layers, af.expmap == "exact")
        out = {}
        for n, (_, _, f, _, _), ok in zip(names, layers, finite):
            B, A = af.factors[n]
            check_finite(n, f, B, A, af.targets[n]["scale"], ok=ok, W=dense[n].detach())
            out[n] = f
        return out

    def shared(self, tensors: dict) -> dict:
        """The base's packed weights of the packed layers not in ``tensors`` (a task leaves them
        alone: its replica runs them on these, shared by every task, outside the cache's bound)."""
        return {n: t for n, t in self.base.items() if n not in tensors}
