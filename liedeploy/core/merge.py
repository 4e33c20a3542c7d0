"""Merging live modules: ``merge_`` folds adapters into plain tensors, ``unmerge_`` restores the
pristine base. What is merged is recorded in the model's :class:`~liedeploy.core.state.LieState`.
(Offline merging of files is :func:`liedeploy.files.file_merge.merge_files`.)
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from liedeploy.core.adapt import iter_adapters, register, unregister
from liedeploy.core.algebra import check_finite, fold_sum
from liedeploy.core.state import KEPT, SPARE, MergedWeight, held, hold, lie_state
from liedeploy.errors import LieError

__all__ = ["merge_", "unmerge_", "is_merged"]


def is_merged(model: nn.Module) -> bool:
    """True when ``merge_`` folded adapters into ``model`` and ``unmerge_`` has not run since."""
    state = lie_state(model)
    return state is not None and state.is_merged


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
    state = lie_state(model)
    if state is None:
        return model  # no adapters: nothing to fold
    records = state.merged
    in_place = keep_base is False or keep_base is None
    if in_place:  # storages used by more than one tensor of the model (tied weights) are not overwritten
        uses: dict = {}
        for t in model.state_dict(keep_vars=True).values():
            uses[t.data_ptr()] = uses.get(t.data_ptr(), 0) + 1
    offload = None if in_place or keep_base is True else torch.device(keep_base)
    work = []
    for name, module, attr, lie in list(iter_adapters(model)):
        W = module.parametrizations[attr].original
        ok: list = []
        kept, param = None, None
        if in_place and uses.get(W.data_ptr(), 0) == 1:  # fold into W's own storage, like PEFT: no new memory
            out = W.data
        else:
            out = None
            spare = held(module, attr + SPARE)
            if spare is not None and spare.shape == W.shape and spare.dtype == W.dtype and spare.device == W.device:
                # the storage of the last merge, kept by unmerge_ (same Parameter when nothing moved it)
                param = state.spare_params.get(name)
                if param is None or param.data_ptr() != spare.data_ptr() or param.dtype != spare.dtype:
                    param = nn.Parameter(spare, requires_grad=False)
                out = param.data
            if offload is not None:
                kept = W.detach().to(offload, copy=True)
        merged = fold_sum(W.detach(), [(lie.lie_B, lie.lie_A, lie.scale)], lie.expmap, out=out, check=ok)
        if not ok[0] and out is not None and out.data_ptr() == W.data_ptr():
            raise LieError(f"merging {name} overflowed and keep_base=False already overwrote it: reload the base")
        check_finite(name, merged, lie.lie_B, lie.lie_A, lie.scale, ok=ok[0], W=W)
        work.append((name, module, attr, lie, W if keep_base is True else kept, merged, param))
    # all checks passed: now switch every parameter (never half-merged)
    for name, module, attr, lie, kept, merged, param in work:
        hold(module, attr + SPARE, None)
        state.spare_params.pop(name, None)
        unregister(module, attr)
        setattr(module, attr, param if param is not None else nn.Parameter(merged, requires_grad=False))
        hold(module, attr + KEPT, kept)
        records[name] = MergedWeight(module, attr, lie)
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
    state = lie_state(model)
    records = state.merged if state is not None else None
    if not records:
        return model
    if base is not None and not isinstance(base, dict):
        from liedeploy.io.safetensors_io import BaseTensors  # the io layer, below core

        base = BaseTensors(str(base))  # the headers once, each tensor read when needed
    restored = {}
    for name, rec in records.items():
        merged = getattr(rec.module, rec.attr)
        if rec.kept is not None:
            src = rec.kept
        elif base is not None:
            src = _base_tensor(base, name)
        else:
            raise LieError("merge_ was called with keep_base=False: pass the base file to unmerge_(model, base=...)")
        if tuple(src.shape) != tuple(merged.shape):
            raise LieError(f"base tensor {name} has shape {tuple(src.shape)}, the model has {tuple(merged.shape)}")
        restored[name] = src
    for name, rec in records.items():
        src = restored[name]
        merged = getattr(rec.module, rec.attr)
        if src is rec.kept and src.device == merged.device and src.dtype == merged.dtype:
            W = src if isinstance(src, nn.Parameter) else nn.Parameter(src, requires_grad=False)  # no copy
        else:
            W = nn.Parameter(src.detach().to(device=merged.device, dtype=merged.dtype, copy=True), requires_grad=False)
        hold(rec.module, rec.attr + KEPT, None)
        keep_spare = not release and merged.data_ptr() != W.data_ptr()
        hold(rec.module, rec.attr + SPARE, merged if keep_spare else None)
        if keep_spare:
            state.spare_params[name] = merged
        else:
            state.spare_params.pop(name, None)
        setattr(rec.module, rec.attr, W)
        if any(p.device != W.device for p in rec.lie.parameters()):  # the model moved while merged
            rec.lie.to(device=W.device)
        register(rec.module, rec.attr, rec.lie)
    state.merged = {}
    return model
