"""A tensor of a module tree by its ``state_dict`` name, one copy for the replica builder, full
tensors and ``disable_adapters``: find its owner, read it, replace it (a parameter stays a
parameter, a buffer a buffer)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from liedeploy.errors import LieError

__all__ = ["owner_of", "get_tensor", "set_tensor"]


def owner_of(model: nn.Module, name: str, error=LieError, where: str = "the model") -> tuple[nn.Module, str]:
    """``(owning module, attribute)`` of ``name``; ``error`` (one sentence) if the module is absent."""
    mod, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(mod) if mod else model), attr
    except AttributeError:
        raise error(f"tensor {name} has no module {mod!r} in {where} to live in") from None


def get_tensor(owner: nn.Module, attr: str) -> Optional[torch.Tensor]:
    """The parameter or buffer ``attr`` of ``owner`` (``None`` if it has neither)."""
    if attr in owner._parameters:
        return owner._parameters[attr]
    return owner._buffers.get(attr)


def set_tensor(owner: nn.Module, attr: str, t: Optional[torch.Tensor], *, buffer: Optional[bool] = None) -> None:
    """Put ``t`` in place of ``owner.attr`` (``None`` removes it). A buffer stays a buffer; anything
    else becomes a frozen Parameter over the same storage. ``buffer`` forces the kind."""
    is_buffer = attr in owner._buffers if buffer is None else buffer
    if t is None:
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
    elif is_buffer:
        owner._buffers[attr] = t
    else:
        owner._parameters[attr] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
