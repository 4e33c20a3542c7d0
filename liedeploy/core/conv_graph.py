"""A packed model's forward as one captured graph: each batch norm folded into the packed
convolution before it, and the ReLU and residual add after it done by oneDNN in the same call.

A model whose Conv2d weights are packed (:mod:`liedeploy.core.conv_pack`) still runs its batch norms,
ReLUs and residual adds as separate operators, each a pass over the activations, and every layer
through ``nn.Module.__call__``. Captured with ``torch.export`` (batch dimension dynamic), the forward
becomes one flat function of its tensors, rewritten here:

- ``conv2d -> batch_norm`` (eval mode, running statistics) becomes one convolution: the weight scaled
  per output channel by ``s = gamma / sqrt(var + eps)``, the bias ``beta + (b - mean) * s``. The
  multiplicative update commutes with that scale (``(W * s) * exp(dW) = (W * exp(dW)) * s``), so a
  bank folds each task straight into the scaled packed base (:class:`FusedConv`);
- a following ``relu`` is oneDNN's eltwise post-op; a following ``add`` of a residual (then
  optionally ``relu``) its binary post-op.

Only a node whose result nothing else reads is fused: the graph says so exactly. Results match
the module's forward up to float32 rounding (the scale is rounded into the weight; oneDNN sums in
its own order); :func:`capture` checks that on the example input, and any model it cannot capture
(``torch.export`` fails, a packed weight used other than by a matching convolution, a buffer
mutated by the forward, a mismatch) keeps running as modules. ``LIEDEPLOY_FUSE=off`` turns it off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.fx._pytree import tree_flatten_spec
from torch.utils._pytree import tree_unflatten

__all__ = ["ConvGraph", "FusedConv", "GraphReplica", "capture", "fuse_status", "packed_conv"]

_CL = torch.channels_last


def fuse_status() -> str:
    """``"ready"``, or why packed models are not captured as fused graphs here."""
    if os.environ.get("LIEDEPLOY_FUSE", "auto").strip().lower() in ("off", "0", "no", "false"):
        return "LIEDEPLOY_FUSE=off"
    if not hasattr(torch, "export") or not hasattr(torch.ops.mkldnn._convolution_pointwise, "binary"):
        return "this torch has no torch.export or no oneDNN convolution with a binary post-op"
    return "ready"


def packed_conv(x, weight, bias, padding, stride, dilation, groups, relu, other):
    """oneDNN's convolution on a packed ``weight``, channels-last, with ``+ other`` then ReLU fused."""
    x = x.contiguous(memory_format=_CL)
    unary = "relu" if relu else None
    if other is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                       unary or "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other.contiguous(memory_format=_CL), weight, bias,
                                                          padding, stride, dilation, groups, "add", 1.0, unary, [], "")


@dataclass(frozen=True)
class FusedConv:
    """One packed convolution of the graph and what was folded into it: ``norm`` names the batch
    norm's (weight, bias, running_mean, running_var), any of the first two None where it has none;
    ``bias`` the conv's own bias. ``key`` names the graph input that takes the fused bias."""

    weight: str
    bias: Optional[str]
    norm: Optional[tuple]
    eps: float
    key: str
    relu: bool = False
    add: bool = False

    def sources(self) -> tuple:
        """Names of the tensors the fused weight and bias depend on, the weight aside."""
        return tuple(n for n in ((self.bias,) + tuple(self.norm or ())) if n is not None)

    def replaced_by(self, tensors) -> bool:
        """Whether ``tensors`` (a task's, by name) replace something folded into this weight or bias."""
        return any(n in tensors for n in self.sources())

    def scaled(self, weight: torch.Tensor, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """``weight`` (dense) times the per-channel scale of the norm folded in (itself where none)."""
        s = self.scale(get)
        return weight.detach() if s is None else weight.detach() * s

    def _scale64(self, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        w, _, _, var = self.norm
        s = torch.rsqrt(get(var).detach().double() + self.eps)
        return s * get(w).detach().double() if w is not None else s

    def scale(self, get: Callable[[str], torch.Tensor]) -> Optional[torch.Tensor]:
        """The per-output-channel scale (float32, shape (O, 1, 1, 1)) folded into the weight, or None.
        ``get(name)`` gives a tensor's value (a task's own, else the base's)."""
        return None if self.norm is None else self._scale64(get).float().view(-1, 1, 1, 1)

    def fused_bias(self, get: Callable[[str], torch.Tensor]) -> Optional[torch.Tensor]:
        """``beta + (b - mean) * s``, or the conv's own bias where no norm was folded (float32; computed
        in float64 and rounded once)."""
        b = get(self.bias).detach().double() if self.bias is not None else None
        if self.norm is None:
            return None if b is None else b.float()
        _, beta, mean, _ = self.norm
        out = ((b if b is not None else 0.0) - get(mean).detach().double()) * self._scale64(get)
        if beta is not None:
            out = out + get(beta).detach().double()
        return out.float().contiguous()


class ConvGraph:
    """The rewritten graph: ``keys`` names, in order, the tensor each graph input takes (a state
    name, or a :class:`FusedConv`'s ``key``), then the model's own inputs follow; ``fused`` maps each
    packed weight name to its :class:`FusedConv`."""

    def __init__(self, module: torch.fx.GraphModule, keys: list, fused: dict, in_spec, out_spec,
                 constants: Optional[dict] = None):
        self.module, self.keys, self.fused = module, keys, fused
        self.constants = dict(constants or {})  # tensors the forward made itself (torch.export lifts them)
        self.signature, self.positional, self.keywords = None, 0, frozenset()
        self._in_spec, self._out_spec = in_spec, out_spec
        self.base: dict = {}  # the base model's fused inputs: scaled packed weights, fused biases (capture)

    def called_as(self, signature, args: tuple, kwargs: dict) -> None:
        """Record how the example called the model: other calls are bound to that form."""
        self.signature, self.positional, self.keywords = signature, len(args), frozenset(kwargs)

    def _canonical(self, args: tuple, kwargs: dict):
        from liedeploy.errors import LieError

        try:
            bound = self.signature.bind(*args, **kwargs).arguments
        except TypeError as e:
            raise LieError(f"the model's fused graph cannot take these inputs: {e}") from None
        names = list(bound)
        order = [p for p in self.signature.parameters][: self.positional]
        extra = set(names) - set(order) - self.keywords
        if extra or any(p not in bound for p in order) or any(k not in bound for k in self.keywords):
            raise LieError(f"the model's fused graph was captured for the inputs {order + sorted(self.keywords)} "
                           f"and cannot take {sorted(names)} (LIEDEPLOY_FUSE=off runs the model as modules)")
        return tuple(bound[p] for p in order), {k: bound[k] for k in self.keywords}

    def describe(self) -> str:
        """What was fused, in one line."""
        f = list(self.fused.values())
        return (f"fused graph: {len(f)} packed convolutions, {sum(c.norm is not None for c in f)} with their batch "
                f"norm folded in, {sum(c.add for c in f)} with a residual add and {sum(c.relu for c in f)} with a ReLU "
                "done by oneDNN")

    def base_values(self, tensors: dict, pack: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
        """The fused inputs for the state ``tensors``: each fused layer's scaled weight packed by
        ``pack(name, dense)``, and its fused bias, by key."""
        get = tensors.__getitem__
        out = {}
        for n, fc in self.fused.items():
            out[n] = pack(n, fc.scaled(tensors[n], get))
            out[fc.key] = fc.fused_bias(get)
        return out

    def lookup(self, *sources: dict) -> Callable[[str], torch.Tensor]:
        """``key -> value`` from the first of ``sources`` that holds the key, else the graph's constants."""
        sources = sources + (self.constants,)

        def value(key):
            for source in sources:
                if key in source:
                    return source[key]
            raise KeyError(key)

        return value

    def replica(self, values: Callable[[str], torch.Tensor]) -> "GraphReplica":
        """A callable model running this graph on ``values(key)`` for each key."""
        return GraphReplica(self, [values(k) for k in self.keys])

    def run(self, tensors: list, args: tuple, kwargs: dict):
        if self.signature is not None and (len(args) != self.positional or set(kwargs) != self.keywords):
            args, kwargs = self._canonical(args, kwargs)
        flat = tree_flatten_spec((args, kwargs), self._in_spec)
        out = self.module(*tensors, *flat)
        out = [t.contiguous() if isinstance(t, torch.Tensor) and t.dim() == 4 else t for t in out]
        return tree_unflatten(out, self._out_spec)


class GraphReplica(nn.Module):
    """A task's model as a :class:`ConvGraph` and the tensors it runs on (no parameters of its own)."""

    def __init__(self, graph: ConvGraph, tensors: list):
        super().__init__()
        self.graph, self.tensors = graph, tensors

    def refill(self, values: Callable[[str], torch.Tensor]) -> "GraphReplica":
        self.tensors = [values(k) for k in self.graph.keys]
        return self

    def forward(self, *args, **kwargs):
        return self.graph.run(self.tensors, args, kwargs)


def _record(model: nn.Module, run: Callable[[nn.Module], object]):
    """The positional and keyword arguments ``run(model)`` calls ``model`` with."""
    seen: list = []

    def hook(mod, args, kwargs):
        if not seen:
            seen.append((args, kwargs))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            run(model)
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the example run never called the model")
    return seen[0]


def _batched(model: nn.Module, args, kwargs, batch: int):
    """The example inputs repeated to ``batch`` along dim 0 (an example of batch 1 would make
    ``torch.export`` specialize the batch size), with the dynamic-shape spec for them (by name)."""
    import inspect

    from torch.export import Dim
    from torch.utils._pytree import tree_map

    dim = Dim("batch", min=1, max=1 << 16)
    sizes = {t.shape[0] for t in torch.utils._pytree.tree_leaves((args, kwargs))
             if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError("the example inputs do not share one batch size")
    n = sizes.pop()

    def grow(t):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.repeat(batch // n + 1, *([1] * (t.dim() - 1)))[:batch].clone()
        return t

    def spec(t):
        return {0: dim} if isinstance(t, torch.Tensor) and t.dim() > 0 else None

    args, kwargs = tree_map(grow, args), tree_map(grow, kwargs)
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return args, kwargs, {name: tree_map(spec, value) for name, value in bound.items()}


def _arg(node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _rewrite(gm: torch.fx.GraphModule, names: dict, plans: dict) -> dict:
    """Fuse in place (``names``: placeholder node -> state name, extended with the fused biases' inputs);
    returns ``{weight name: FusedConv}``. Raises ValueError where a packed weight cannot run packed."""
    aten = torch.ops.aten
    g = gm.graph
    fused: dict = {}
    first = next(iter(g.nodes))
    convs = [n for n in g.nodes if n.op == "call_function" and n.target is aten.conv2d.default]
    shared = {n.args[1] for n in convs if sum(c.args[1] is n.args[1] for c in convs) > 1}
    inputs: dict = {}  # fused-bias key -> its placeholder
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not aten.conv2d.default:
            continue
        w = node.args[1]
        wname = names.get(w)
        if wname not in plans:
            continue
        plan = plans[wname]
        b = _arg(node, 2, "bias", None)
        conf = (tuple(_arg(node, 4, "padding", [0, 0])), tuple(_arg(node, 3, "stride", [1, 1])),
                tuple(_arg(node, 5, "dilation", [1, 1])), int(_arg(node, 6, "groups", 1)))
        if conf != (tuple(plan.padding), tuple(plan.stride), tuple(plan.dilation), plan.groups):
            raise ValueError(f"{wname} is used by a convolution its packing was not planned for")
        if b is not None and b not in names:
            raise ValueError(f"{wname}'s bias is computed in the forward")
        chain, last, norm, eps, relu, other = [node], node, None, 0.0, False, None
        user = _only_user(last)
        if (user is not None and user.target is aten.batch_norm.default and user.args[0] is last
                and w not in shared  # a weight two convolutions use takes no one norm's scale
                and not _arg(user, 5, "training", False)):
            parts = [_arg(user, i, k, None) for i, k in ((1, "weight"), (2, "bias"), (3, "running_mean"),
                                                          (4, "running_var"))]
            if parts[2] is not None and parts[3] is not None and all(p is None or p in names for p in parts):
                norm = tuple(None if p is None else names[p] for p in parts)
                eps = float(_arg(user, 7, "eps", 1e-5))
                chain.append(user)
                last = user
        user = _only_user(last)
        if (user is not None and user.target in (aten.add.Tensor, aten.add_.Tensor) and len(user.args) >= 2
                and _arg(user, 2, "alpha", 1) == 1 and isinstance(user.args[1], torch.fx.Node)
                and isinstance(user.args[0], torch.fx.Node)
                and (user.args[0] is last or (user.target is aten.add.Tensor and user.args[1] is last))):
            cand = user.args[1] if user.args[0] is last else user.args[0]
            if cand is not last and _same_shape(cand, last):
                other = cand
                chain.append(user)
                last = user
        user = _only_user(last)
        if user is not None and user.target in (aten.relu.default, aten.relu_.default) and user.args[0] is last:
            relu = True
            chain.append(user)
            last = user
        key = f"{wname}#fused_bias"
        fc = FusedConv(wname, names.get(b) if b is not None else None, norm, eps, key, relu, other is not None)
        pb = inputs.get(key)
        if pb is None:  # one input per conv weight, however many convolutions use it
            with g.inserting_before(first):
                pb = inputs[key] = g.placeholder(key.replace(".", "_").replace("#", "__"))
            names[pb] = key
        with g.inserting_after(last):
            new = g.call_function(packed_conv, (node.args[0], w, pb, list(plan.padding), list(plan.stride),
                                                list(plan.dilation), plan.groups, relu, other))
        new.meta = dict(last.meta)  # the same value: later fusions read its shape
        last.replace_all_uses_with(new)
        for n in reversed(chain):
            g.erase_node(n)
        fused[wname] = fc
    for p, n in names.items():
        if n in plans and p.users and any(u.target is not packed_conv for u in p.users):
            raise ValueError(f"{n} is packed but read by something other than its convolution")
    return fused


def _same_shape(a, b) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


def capture(model: nn.Module, run: Callable[[nn.Module], object], plans: dict, tensors: dict,
            pack: Callable[[str, torch.Tensor], torch.Tensor]) -> tuple[Optional[ConvGraph], str]:
    """``model``'s forward as a :class:`ConvGraph` with the packed layers of ``plans`` fused, or None
    and why. ``run(model)`` calls the model on an example input; ``tensors``: its state by name (the
    base values); ``pack(name, dense)`` packs a weight in its plan's layout: the graph's ``base``
    holds the base's fused inputs so packed (checked against the model's forward here)."""
    why = fuse_status()
    if why != "ready":
        return None, why
    try:
        args, kwargs = _record(model, run)
        args, kwargs, dyn = _batched(model, args, kwargs, 2)
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as e:  # noqa: BLE001 - any failure to capture: the model runs as modules
        return None, f"torch.export could not capture the forward ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    from torch.export.graph_signature import InputKind, OutputKind

    sig = ep.graph_signature
    if any(o.kind is not OutputKind.USER_OUTPUT for o in sig.output_specs):
        return None, "the forward mutates a buffer"
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names, user = {}, []
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind is InputKind.USER_INPUT:
            user.append(node)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            names[node] = spec.target
        else:
            return None, f"the captured forward takes a {spec.kind.name.lower()} input"
    consts = {}
    for node, name in list(names.items()):
        if name not in tensors:
            value = ep.constants.get(name) if name in getattr(ep, "constants", {}) else None
            if value is None:
                return None, f"the captured forward reads {name}, which is not in the model's state"
            consts[name] = value
    try:
        fused = _rewrite(gm, names, plans)
        if not fused:
            return None, "no packed convolution found in the captured forward"
        for p in [p for p in names if not p.users]:
            gm.graph.erase_node(p)
            del names[p]
        gm.graph.lint()
        gm.recompile()
    except ValueError as e:  # a packed weight that cannot run packed in this graph
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a graph the rewrite does not understand: the model runs as modules
        return None, f"the captured forward could not be rewritten ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    keys = [names[n] for n in gm.graph.nodes if n.op == "placeholder" and n in names]
    graph = ConvGraph(gm, keys, fused, ep.call_spec.in_spec, ep.call_spec.out_spec, consts)
    import inspect

    graph.called_as(inspect.signature(model.forward), args, kwargs)
    try:
        graph.base = graph.base_values(tensors, pack)
        ok = _check(model, graph, tensors, args, kwargs)
    except Exception as e:  # noqa: BLE001
        return None, f"the fused graph failed on the example input ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not ok:
        return None, "the fused graph's outputs differ from the model's on the example input"
    return graph, "ready"


def _check(model, graph: ConvGraph, tensors: dict, args, kwargs) -> bool:
    from liedeploy.core.outputs import flatten_named

    rep = graph.replica(graph.lookup(graph.base, tensors))
    for a, k in ((args, kwargs), _first(args, kwargs)):
        with torch.inference_mode():
            ref = flatten_named(model(*a, **k))
            got = flatten_named(rep(*a, **k))
        if [n for n, _ in ref] != [n for n, _ in got]:
            return False
        for (_, r), (_, o) in zip(ref, got):
            if r.shape != o.shape or r.dtype != o.dtype:
                return False
            if r.is_floating_point():
                tol = 1e-4 * max(1.0, float(r.abs().max()) if r.numel() else 1.0)
                if not torch.allclose(r, o, rtol=1e-4, atol=tol):
                    return False
            elif not torch.equal(r, o):
                return False
    return True


def _first(args, kwargs):
    """The example inputs cut to batch 1."""
    from torch.utils._pytree import tree_map

    cut = lambda t: t[:1].clone() if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
    return tree_map(cut, args), tree_map(cut, kwargs)
