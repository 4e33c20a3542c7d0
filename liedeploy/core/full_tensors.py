"""Tensors a task replaces whole (adapter format "2"): a new classifier head, a task-specific norm.

``full_tensors(model)`` lists them (the floating tensors of the state's ``modules_to_save``);
``install_full_tensors`` puts a task's in place (shapes may differ from the base's: a head with
another number of classes) and keeps the base's in the state's ``full_originals``;
``restore_full_tensors`` gives the base's back.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from liedeploy.core.tensors import get_tensor, owner_of, set_tensor
from liedeploy.core.state import BASE, ensure_state, held, hold, lie_state
from liedeploy.errors import AdapterFileError

__all__ = ["full_tensors", "install_full_tensors", "restore_full_tensors"]



def full_tensors(model: nn.Module) -> dict:
    """``{state_dict name: tensor}`` a task replaces whole: the floating tensors (parameters and
    buffers such as a norm's running statistics) of ``modules_to_save``."""
    out = {}
    state = lie_state(model)
    for mod_name in state.modules_to_save if state is not None else []:
        module = model.get_submodule(mod_name)
        for k, t in module.state_dict(keep_vars=True).items():
            if t.is_floating_point() and t.dtype != torch.float64 and ".parametrizations." not in k:
                out[f"{mod_name}.{k}" if mod_name else k] = t
    return out


def install_full_tensors(model: nn.Module, full: Mapping[str, torch.Tensor], *, path: str = "the adapter") -> None:
    """Put a task's full tensors in place (their shapes may differ from the model's: a new head).

    The replaced tensors are kept in the state's ``full_originals`` (``{name: tensor}``) so that
    ``remove_adapters_`` and ``disable_adapters`` give the base back.
    """
    originals = ensure_state(model).full_originals
    for P, t in full.items():
        owner, attr = owner_of(model, P, AdapterFileError, where=f"the model (full tensor of {path})")
        old = get_tensor(owner, attr)
        if P not in originals:  # the base's own tensor, kept in the module tree until restored
            originals[P] = (owner, attr, old is not None, attr in owner._buffers)
            hold(owner, attr + BASE, old)
        device = old.device if old is not None else next(model.parameters()).device
        new = t.detach().to(device=device, copy=True)
        set_tensor(owner, attr, new)
        if isinstance(owner, nn.Linear) and attr == "weight":  # keep the layer's own description true
            owner.out_features, owner.in_features = int(new.shape[0]), int(new.shape[1])


def restore_full_tensors(model: nn.Module) -> None:
    """Undo :func:`install_full_tensors` (the base's own tensors back)."""
    state = lie_state(model)
    if state is None:
        return
    for P, (owner, attr, had, is_buffer) in state.full_originals.items():
        old = held(owner, attr + BASE)
        hold(owner, attr + BASE, None)
        set_tensor(owner, attr, old if had else None, buffer=is_buffer)
        if isinstance(owner, nn.Linear) and attr == "weight" and old is not None:
            owner.out_features, owner.in_features = int(old.shape[0]), int(old.shape[1])
    state.full_originals = {}
