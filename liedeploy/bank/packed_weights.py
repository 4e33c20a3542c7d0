"""A bank's packed Conv2d weights: which layers, the base in oneDNN's layout, a task's fold into it.

:meth:`liedeploy.AdapterBank.pack_convs` fills it; the bank's folds then go through :meth:`fold`
for the layers it names (every packed layer of a task in one kernel call) and give each replica
the base's packed copy of the layers the task leaves alone (:meth:`shared`). See
:mod:`liedeploy.core.conv_pack` for the layouts and the kernel.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from liedeploy.core import conv_graph, conv_pack
from liedeploy.core.adapter_file import AdapterFile
from liedeploy.core.algebra import check_finite, compute_dtype

__all__ = ["PackedWeights"]


class PackedWeights:
    """``plans`` (weight name -> :class:`~liedeploy.core.conv_pack.ConvPlan`) and ``base`` (weight
    name -> the base weight packed so); empty until :meth:`plan`. Where the model's forward could be
    captured (:mod:`liedeploy.core.conv_graph`), ``graph`` runs every replica, with each batch norm
    folded into the packed convolution before it: ``base`` then holds the scaled weights, and a task
    that brings its own norm or conv bias (``modules_to_save``) gets its own scaled copy of that
    layer. Not thread safe: the bank holds its lock around :meth:`plan`; the rest only reads."""

    def __init__(self):
        self.plans: dict = {}
        self.base: dict = {}
        self.graph: Optional[conv_graph.ConvGraph] = None
        self.reason = "not planned"

    def plan(self, model: torch.nn.Module, tensors: dict, run: Callable, batches) -> list:
        """Plan and pack ``model``'s Conv2d weights (``tensors``: its state by name); the names packed."""
        plans = {n: p for n, p in conv_pack.plan_convs(model, run, batches).items() if n in tensors}
        graph, why = (conv_graph.capture(model, run, plans, tensors, lambda n, d: plans[n].pack(d)) if plans
                      else (None, "no Conv2d layer qualifies for packing"))
        scaled = graph.base if graph is not None else {}  # the fused layers' scaled bases, packed at capture
        base = {n: scaled[n] if n in scaled else p.pack(tensors[n]) for n, p in plans.items()}
        if plans and graph is None:  # replicas will run as module trees: check that the model takes packed weights
            refused = _modules_refuse(model, run, base)
            if refused:
                plans, base, why = {}, {}, refused
        self.plans, self.base, self.graph, self.reason = plans, base, graph, why
        return sorted(plans)

    def fold(self, af: AdapterFile, names: list, take: Callable[[torch.Tensor], Optional[torch.Tensor]],
             dense: dict, own: Optional[dict] = None) -> dict:
        """``{name: packed folded weight}`` for the packed ``names`` a task adapts, in one kernel call,
        written into storage from ``take`` (a pool) or a new copy of the packed base; a non-finite
        result is refused by name as the dense path does (``dense``: the base's dense tensors;
        ``own``: the task's other tensors by name, whose norms scale their layers' bases)."""
        own = own or {}
        fused = self.graph.fused if self.graph is not None else {}
        layers = []
        for n in names:
            base = self.base[n]
            fc = fused.get(n)
            mine = fc is not None and fc.replaced_by(own)
            if mine:  # the task's own norm: its own scaled base for this layer (folded in place)
                base = self.plans[n].pack(fc.scaled(dense[n], _lookup(own, dense)))
            out = take(base)
            B, A = af.factors[n]
            cdt = compute_dtype(base.dtype)
            layers.append((self.plans[n], base, (base if mine else base.clone()) if out is None else out,
                           B.to(dtype=cdt) * af.targets[n]["scale"], A.to(dtype=cdt)))
        finite = conv_pack.fold_packed(layers, af.expmap == "exact")
        out = {}
        for n, (_, _, f, _, _), ok in zip(names, layers, finite):
            B, A = af.factors[n]
            check_finite(n, f, B, A, af.targets[n]["scale"], ok=ok, W=dense[n].detach())
            out[n] = f
        return out

    def own_layers(self, tensors: dict, dense: dict) -> dict:
        """The graph inputs a task needs of its own beyond its folds, given its ``tensors`` (folded
        and full, by name): for each fused layer whose norm or conv bias the task replaces, the fused
        bias, and the scaled packed weight where the task does not adapt it or replaces it whole."""
        if self.graph is None:
            return {}
        out = {}
        get = _lookup(tensors, dense)
        for n, fc in self.graph.fused.items():
            whole = n in tensors and tensors[n].layout != torch._mkldnn  # a full replacement of the weight
            if not (fc.replaced_by(tensors) or whole):
                continue
            if whole or n not in tensors:
                out[n] = self.plans[n].pack(fc.scaled(get(n), get))
            bias = fc.fused_bias(get)
            if bias is not None:
                out[fc.key] = bias
        return out

    def replica(self, tensors: dict, dense: dict, spare=None):
        """A task's model on the fused graph: its ``tensors`` (by name, graph inputs included), the
        packed base for the rest of the packed layers, the base's state for everything else."""
        value = self.graph.lookup(tensors, self.base, self.graph.base, dense)
        return spare.refill(value) if spare is not None else self.graph.replica(value)

    def shared(self, tensors: dict) -> dict:
        """The base's packed weights of the packed layers not in ``tensors`` (a task leaves them
        alone: its replica runs them on these, shared by every task, outside the cache's bound)."""
        return {n: t for n, t in self.base.items() if n not in tensors}


def _modules_refuse(model: torch.nn.Module, run: Callable, base: dict) -> str:
    """Why ``model`` cannot run with the packed weights ``base`` as modules, or ``""``: a forward that
    reads a packed weight other than through its convolution fails or gives other outputs."""
    from liedeploy.bank.replica import build_replica
    from liedeploy.core.outputs import flatten_named

    replica = build_replica(model, base)
    conv_pack.adopt(replica, list(base))
    try:
        with torch.inference_mode():
            ref, got = flatten_named(run(model)), flatten_named(run(replica))
    except Exception as e:  # noqa: BLE001 - any failure: the model does not take packed weights
        return f"the model fails with its Conv2d weights packed ({type(e).__name__}: {str(e).splitlines()[0][:100]}); none packed"
    same = [n for n, _ in ref] == [n for n, _ in got] and all(
        a.shape == b.shape and (torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(a.abs().max())))
                                if a.is_floating_point() else torch.equal(a, b))
        for (_, a), (_, b) in zip(ref, got))
    return "" if same else "the model's outputs change with its Conv2d weights packed; none packed"


def _lookup(first: dict, then: dict) -> Callable[[str], torch.Tensor]:
    return lambda n: first[n] if n in first else then[n]
