"""Conv2d weights kept in oneDNN's blocked layout, and folds written straight into it.

torch's CPU convolution hands oneDNN a plain OIHW weight, and oneDNN reorders it into a blocked
layout on every call (at batch 1 torch takes its slower im2col path for most 3x3 convolutions
instead). For a model whose weights do not stay in cache, that is a large part of a small batch's
cost: on bench_serve's ResNet-18-like model at 64x64 (45 MB of weights), a forward with every
Conv2d weight prepacked and a channels-last input is about 2x faster than torch eager at batch 1
and 1.06-1.4x at 2-16 (``benchmarks/bench_conv_pack.py``; the README gives its runs). Prepacking
per task with oneDNN's own reorder would cost about 6x the fold itself, so a bank that packs
(:meth:`liedeploy.AdapterBank.pack_convs`) folds each task's Conv2d weights straight into the
blocked layout instead: the same arithmetic as the fused fold, every layer of a task in one kernel
call (:func:`liedeploy.core.native.fold_blocked`), 1.15-1.36x the dense fold's time.

Which layers are packed (:func:`plan_convs`): plain ``nn.Conv2d`` modules in float32 on the CPU,
with zero padding given as numbers, whose blocked layout oneDNN picks for the input shapes the
caller will send is ``Acdb16a``, ``Acdb32a``, ``Acdb48a`` or ``Acdb64a`` (output channels in blocks
of 16, 32, 48 or 64, innermost; per block the columns in (kh, kw, in) order) and the same for every
batch size named.
The layout is not guessed: an index tensor is packed by oneDNN and read back. Other layers keep
their dense weights and torch's own convolution. A packed layer gives the same results as the dense
one up to float32 rounding (oneDNN sums in its own order; batch 1 takes oneDNN instead of torch's
im2col); ``LIEDEPLOY_PACK=off`` turns packing off.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvPlan", "PackedConv2d", "adopt", "channels_last_safe", "fold_packed", "nbytes", "pack_model", "pack_status",
           "plan_convs"]

_LAYOUT_MAX = 1 << 24  # an index tensor in float32 is exact up to here


def pack_status() -> str:
    """``"ready"``, or one sentence saying why Conv2d weights are not packed here."""
    if os.environ.get("LIEDEPLOY_PACK", "auto").strip().lower() in ("off", "0", "no", "false"):
        return "LIEDEPLOY_PACK=off"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "data_ptr")):
        return "this torch has no oneDNN (mkldnn) convolution with packed weights"
    from liedeploy.core import native

    if not native.available():
        return native.status()
    return "ready"


def nbytes(t: torch.Tensor) -> int:
    """Bytes held by ``t``, padding of a packed (mkldnn) tensor included."""
    if t.layout == torch._mkldnn:
        return int(torch.ops.mkldnn._nbytes(t))
    return t.numel() * t.element_size()


def _raw(t: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` float32 values of a packed tensor's memory, as a dense view of it."""
    buf = (ctypes.c_float * count).from_address(torch.ops.mkldnn.data_ptr(t))
    return torch.frombuffer(buf, dtype=torch.float32, count=count)


@dataclass(frozen=True)
class ConvPlan:
    """How one Conv2d's weight is packed: oneDNN's arguments and the layout ``Acdb{blk}a``."""

    padding: tuple
    stride: tuple
    dilation: tuple
    groups: int
    input_size: tuple
    shape: tuple
    blk: int

    @property
    def columns(self) -> int:
        return self.shape[1] * self.shape[2] * self.shape[3]

    def _args(self) -> tuple:
        return list(self.padding), list(self.stride), list(self.dilation), self.groups

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense`` (OIHW float32) reordered by oneDNN into this plan's layout (a new tensor)."""
        return torch.ops.mkldnn._reorder_convolution_weight(dense.detach().contiguous(), *self._args(),
                                                             list(self.input_size))



def fold_packed(layers: Sequence[tuple], exact: bool) -> list:
    """Fold a task's packed Conv2d weights in one call: each of ``layers`` is ``(plan, base, out, B, A)``
    with ``base`` and ``out`` packed in ``plan``'s layout (``out`` is written), ``B`` (already scaled)
    and ``A`` the float32 factors; the same arithmetic as the dense fused fold. Returns, per layer,
    whether every result is finite."""
    from liedeploy.core import native

    return native.fold_blocked([(torch.ops.mkldnn.data_ptr(base), torch.ops.mkldnn.data_ptr(out), B, A, plan.shape,
                                 plan.blk) for plan, base, out, B, A in layers], exact)


def _layout(conv: nn.Conv2d, input_size: list) -> Optional[int]:
    """``blk`` if oneDNN packs ``conv``'s weight as ``Acdb{blk}a`` for inputs of ``input_size``, else None."""
    from liedeploy.core.native import BLOCKS, blocked_layout

    count = conv.weight.numel()
    if count >= _LAYOUT_MAX:
        return None
    index = torch.arange(1, count + 1, dtype=torch.float32).view(conv.weight.shape)
    packed = torch.ops.mkldnn._reorder_convolution_weight(index, list(conv.padding), list(conv.stride),
                                                          list(conv.dilation), conv.groups, input_size)
    size = nbytes(packed) // 4
    for blk in BLOCKS:
        want = blocked_layout(index, blk)  # 0 where oneDNN pads the last block of output channels
        if want.numel() == size and torch.equal(_raw(packed, size), want):
            return blk
    return None


def _candidate(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" and m.weight.dim() == 4)


def plan_convs(model: nn.Module, run: Callable[[nn.Module], object], batches: Sequence[int]) -> dict:
    """``{weight name: ConvPlan}`` for the Conv2d layers of ``model`` worth packing.

    ``run(model)`` calls the model once on an example input (batch size any) with the non-batch
    shapes it will be served; each layer's layout is checked for every batch size in ``batches``.
    """
    convs = {name: m for name, m in model.named_modules() if _candidate(m)}
    seen: dict = {}

    def hook(name):
        def record(mod, args):  # returns None: the call's arguments stay as they are
            if name not in seen:
                seen[name] = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
        return record

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in convs.items()]
    try:
        with torch.inference_mode():
            run(model)
    finally:
        for hk in hooks:
            hk.remove()
    plans = {}
    for name, m in convs.items():
        shape = seen.get(name)
        if shape is None or len(shape) != 4:
            continue
        blks = {_layout(m, [int(b), *shape[1:]]) for b in batches}
        if len(blks) != 1 or None in blks:
            continue
        plans[f"{name}.weight" if name else "weight"] = ConvPlan(
            tuple(m.padding), tuple(m.stride), tuple(m.dilation), m.groups, (int(batches[0]), *shape[1:]),
            tuple(m.weight.shape), blks.pop())
    return plans


class PackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose ``weight`` is packed by oneDNN (see :func:`adopt`): float32 CPU inputs run
    ``mkldnn._convolution_pointwise`` on the packed weight, with no reorder per call; any other input
    (autograd, another dtype or device, an unbatched one) runs torch's convolution on the dense weight.

    oneDNN computes these convolutions channels-last: an input in ``torch.channels_last`` gives an
    output in it with no copy either way (a model fed channels-last keeps its activations so, see
    :func:`channels_last_safe`); any other input is converted, and its output given back contiguous."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.layout != torch._mkldnn:
            return super().forward(x)
        if (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4
                and not (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)))):
            last = x.is_contiguous(memory_format=torch.channels_last)
            y = torch.ops.mkldnn._convolution_pointwise(
                x if last else x.contiguous(memory_format=torch.channels_last), w, self.bias, list(self.padding),
                list(self.stride), list(self.dilation), self.groups, "none", [], "")
            return y if last else y.contiguous()
        return F.conv2d(x, w.to_dense(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def channels_last_safe(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether ``model`` runs ``example`` (4-D, float32) given in ``torch.channels_last`` to the same
    outputs as given contiguous: false for a model that ``.view()``s an activation whose strides that
    memory format changes. Packed convolutions then run with no layout copies."""
    from liedeploy.core.outputs import flatten_named

    try:
        with torch.inference_mode():
            ref = flatten_named(model(example.contiguous()))
            got = flatten_named(model(example.contiguous(memory_format=torch.channels_last)))
    except Exception:  # noqa: BLE001 - any failure: the model is not safe to feed channels-last
        return False
    if [n for n, _ in ref] != [n for n, _ in got]:
        return False
    return all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5) for (_, a), (_, b) in zip(ref, got))


def pack_model(model: nn.Module, plans: dict) -> nn.Module:
    """Pack ``model``'s own weights in place as ``plans`` (from :func:`plan_convs`) say, and make those
    layers run packed: a single model served without a bank (a bank packs per task instead)."""
    with torch.no_grad():
        for name, plan in plans.items():
            mod, _, attr = name.rpartition(".")
            owner = model.get_submodule(mod) if mod else model
            setattr(owner, attr, nn.Parameter(plan.pack(getattr(owner, attr)), requires_grad=False))
    adopt(model, plans)
    return model


def adopt(replica: nn.Module, names) -> None:
    """Make the Conv2d owners of the packed weights ``names`` in ``replica`` (a bank's per-task
    module tree, whose modules are its own) run them packed."""
    for name in names:
        mod, _, _ = name.rpartition(".")
        owner = replica.get_submodule(mod) if mod else replica
        if type(owner) is nn.Conv2d:
            owner.__class__ = PackedConv2d
