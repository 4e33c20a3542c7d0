"""Tensors a task replaces whole (adapter format "2"): a new classifier head, a task-specific norm.

``full_tensors(model)`` lists them (the floating tensors of ``model.lie_modules_to_save``);
``install_full_tensors`` puts a task's in place (shapes may differ from the base's: a head with
another number of classes) and keeps the base's in ``model.lie_full_originals``;
``restore_full_tensors`` gives the base's back.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from liedeploy.errors import AdapterFileError

__all__ = ["full_tensors", "install_full_tensors", "restore_full_tensors"]

_FULL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def full_tensors(model: nn.Module) -> dict:
    """``{state_dict name: tensor}`` a task replaces whole: the floating tensors (parameters and
    buffers such as a norm's running statistics) of ``modules_to_save``."""
    out = {}
    for mod_name in getattr(model, "lie_modules_to_save", None) or []:
        module = model.get_submodule(mod_name)
        for k, t in module.state_dict(keep_vars=True).items():
            if t.dtype in _FULL_DTYPES and ".parametrizations." not in k:
                out[f"{mod_name}.{k}" if mod_name else k] = t
    return out


def install_full_tensors(model: nn.Module, full: Mapping[str, torch.Tensor], *, path: str = "the adapter") -> None:
    """Put a task's full tensors in place (their shapes may differ from the model's: a new head).

    The replaced tensors are kept in ``model.lie_full_originals`` (``{name: tensor}``) so that
    ``remove_adapters_`` and ``disable_adapters`` give the base back.
    """
    originals = getattr(model, "lie_full_originals", None)
    if originals is None:
        originals = model.lie_full_originals = {}
    for P, t in full.items():
        mod_name, _, attr = P.rpartition(".")
        try:
            owner = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise AdapterFileError(f"{path}: full tensor {P} has no module {mod_name!r} in the model") from None
        old = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
        if P not in originals:
            originals[P] = old
        device = old.device if old is not None else next(model.parameters()).device
        new = t.detach().to(device=device, copy=True)
        if attr in owner._buffers:
            owner._buffers[attr] = new
        else:
            owner._parameters[attr] = nn.Parameter(new, requires_grad=False)
        if isinstance(owner, nn.Linear) and attr == "weight":  # keep the layer's own description true
            owner.out_features, owner.in_features = int(new.shape[0]), int(new.shape[1])


def restore_full_tensors(model: nn.Module) -> None:
    """Undo :func:`install_full_tensors` (the base's own tensors back)."""
    for P, old in (getattr(model, "lie_full_originals", None) or {}).items():
        mod_name, _, attr = P.rpartition(".")
        owner = model.get_submodule(mod_name) if mod_name else model
        if old is None:
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)
        elif attr in owner._buffers:
            owner._buffers[attr] = old
        else:
            owner._parameters[attr] = old
        if isinstance(owner, nn.Linear) and attr == "weight" and old is not None:
            owner.out_features, owner.in_features = int(old.shape[0]), int(old.shape[1])
    if hasattr(model, "lie_full_originals"):
        del model.lie_full_originals
