"""Merging: ``merge_`` folds adapters into live modules, ``unmerge_`` restores the pristine base,
``merge_files`` (implemented in :mod:`liedeploy.file_merge`) merges safetensors files offline.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from liedeploy.core.adapt import LieParametrization, iter_adapters, register, unregister
from liedeploy.core.algebra import check_finite, fold_sum
from liedeploy.errors import LieError
from liedeploy.files.file_merge import merge_files

__all__ = ["merge_", "unmerge_", "merge_files", "is_merged"]


class _Merged:
    """What ``merge_`` keeps for one parameter so ``unmerge_`` can restore it bit for bit."""

    __slots__ = ("module", "attr", "lie", "kept")

    def __init__(self, module: nn.Module, attr: str, lie: LieParametrization, kept: Optional[torch.Tensor]):
        self.module, self.attr, self.lie, self.kept = module, attr, lie, kept

    # the adapter's view, used by save_adapter on a merged model
    B = property(lambda self: self.lie.lie_B)
    A = property(lambda self: self.lie.lie_A)
    scale = property(lambda self: self.lie.scale)
    expmap = property(lambda self: self.lie.expmap)

    def pristine(self) -> torch.Tensor:
        if self.kept is None:
            raise LieError("merge_ was called with keep_base=False: pass the base file to unmerge_(model, base=...)")
        return self.kept


def is_merged(model: nn.Module) -> bool:
    """True when ``merge_`` folded adapters into ``model`` and ``unmerge_`` has not run since."""
    return bool(getattr(model, "_lie_merged", None))


def merge_(model: nn.Module, keep_base: Union[bool, str, torch.device] = True) -> nn.Module:
    """Fold every Lie adapter into a plain tensor: the model becomes the base architecture again.

    W' = W * exp(dW) (or W * (1 + dW) for first_order adapters), computed in at least float32 and
    rounded once to the base dtype. Idempotent: already merged parameters are left alone.

    Args:
        model: a model with live adapters (``apply_adapters_`` / ``load_adapter``).
        keep_base: how ``unmerge_`` will get the pristine base back: ``True`` keeps the original
            tensors where they are (no copy; the merged tensors are new), a device (``"cpu"``)
            keeps a copy there (frees accelerator memory), ``False`` keeps nothing and folds in
            place into the base tensors' own storage, like PEFT's merge (no new memory; ``unmerge_``
            then needs ``base=``; an overflow then leaves the model unusable and is reported).
            A tensor tied to another one (GPT-2's ``wte``/``lm_head``) is never overwritten in
            place: the merged model computes exactly what the adapted model computed.

    Returns:
        ``model``.

    Raises:
        LieError: a merged tensor would not be finite (names the tensor and its largest |dW|).
    """
    records = getattr(model, "_lie_merged", None) or {}
    in_place = keep_base is False or keep_base is None
    if in_place:  # storages used by more than one tensor of the model (tied weights) are not overwritten
        uses: dict = {}
        for t in model.state_dict(keep_vars=True).values():
            uses[t.data_ptr()] = uses.get(t.data_ptr(), 0) + 1
    spares = getattr(model, "_lie_spare", None) or {}
    work = []
    for name, module, attr, lie in list(iter_adapters(model)):
        W = module.parametrizations[attr].original
        ok: list = []
        kept, param = None, None
        if in_place and uses.get(W.data_ptr(), 0) == 1:  # fold into W's own storage, like PEFT: no new memory
            out = W.data
        else:
            out = None
            spare = spares.get(name)
            if spare is not None and spare.shape == W.shape and spare.dtype == W.dtype and spare.device == W.device:
                param, out = spare, spare.data  # the storage of the last merge, kept by unmerge_
            if not in_place and keep_base is not True:
                kept = W.detach().to(torch.device(keep_base), copy=True)
        merged = fold_sum(W.detach(), [(lie.lie_B, lie.lie_A, lie.scale)], lie.expmap, out=out, check=ok)
        if not ok[0] and out is not None and out.data_ptr() == W.data_ptr():
            raise LieError(f"merging {name} overflowed and keep_base=False already overwrote it: reload the base")
        check_finite(name, merged, lie.lie_B, lie.lie_A, lie.scale, ok=ok[0], W=W)
        work.append((name, module, attr, lie, W if keep_base is True else kept, merged, param))
    # all checks passed: now switch every parameter (never half-merged)
    for name, module, attr, lie, kept, merged, param in work:
        spares.pop(name, None)
        unregister(module, attr)
        setattr(module, attr, param if param is not None else nn.Parameter(merged, requires_grad=False))
        records[name] = _Merged(module, attr, lie, kept)
    model._lie_merged = records
    return model


def _base_tensor(base, name: str) -> torch.Tensor:
    if isinstance(base, dict):
        if name not in base:
            raise LieError(f"the base given to unmerge_ has no tensor {name}")
        return base[name]
    return base.get(name)  # a BaseTensors


def unmerge_(model: nn.Module, base: Union[None, str, dict] = None, *, release: bool = False) -> nn.Module:
    """Undo ``merge_``: restore the pristine base tensors bit for bit and re-attach the adapters.

    The base comes from the copy ``merge_`` kept or, with ``base=``, from a safetensors file
    (or sharded index) or a state dict. Never computed by division.

    The merged tensors are kept for the next ``merge_``, which folds into the same storage (no new
    memory to fault in; the merged parameters keep their identity, which suits compiled graphs):
    unmerged, the model still holds them. ``release=True`` frees them instead.
    """
    records = getattr(model, "_lie_merged", None)
    if not records:
        return model
    if base is not None and not isinstance(base, dict):
        from liedeploy.io.safetensors_io import BaseTensors

        base = BaseTensors(str(base))  # the headers once, each tensor read when needed
    restored = {}
    spares = {} if release else (getattr(model, "_lie_spare", None) or {})
    for name, rec in records.items():
        merged = getattr(rec.module, rec.attr)
        if rec.kept is not None:
            src = rec.kept
        elif base is not None:
            src = _base_tensor(base, name)
        else:
            rec.pristine()  # raises the explanation
        if tuple(src.shape) != tuple(merged.shape):
            raise LieError(f"base tensor {name} has shape {tuple(src.shape)}, the model has {tuple(merged.shape)}")
        restored[name] = src
    for name, rec in records.items():
        src = restored[name]
        merged = getattr(rec.module, rec.attr)
        if isinstance(src, nn.Parameter) and src.device == merged.device and src.dtype == merged.dtype:
            W = src
        else:
            W = nn.Parameter(src.detach().to(device=merged.device, dtype=merged.dtype, copy=True), requires_grad=False)
        if not release and merged.data_ptr() != W.data_ptr():
            spares[name] = merged
        setattr(rec.module, rec.attr, W)
        register(rec.module, rec.attr, rec.lie)
    model._lie_merged = {}
    model._lie_spare = spares
    return model
