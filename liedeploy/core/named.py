"""Several named adapters on one live model, and running the base with adapters off (PEFT's API).

    load_adapter(model, "cats.safetensors", adapter_name="cats")   # the first one is active
    load_adapter(model, "dogs.safetensors", adapter_name="dogs")
    set_adapter(model, "dogs")          # factors copied in place: no recompilation
    with disable_adapters(model):       # the base, bit for bit
        y0 = model(x)

For serving many tasks concurrently, use :class:`liedeploy.AdapterBank` (no global switch).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from liedeploy.core.adapter_file import activate_adapter
from liedeploy.core.full_tensors import install_full_tensors, restore_full_tensors
from liedeploy.core.merge import is_merged, merge_, unmerge_
from liedeploy.core.state import lie_state
from liedeploy.core.tensors import get_tensor
from liedeploy.errors import LieError

__all__ = ["set_adapter", "disable_adapters", "active_adapter", "list_adapters"]


def list_adapters(model: nn.Module) -> list:
    """Names of the adapters loaded with ``load_adapter(..., adapter_name=...)``."""
    state = lie_state(model)
    return list(state.adapters) if state is not None else []


def active_adapter(model: nn.Module):
    """The name of the active named adapter (``None`` without named adapters)."""
    state = lie_state(model)
    return state.active_adapter if state is not None else None


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make the named adapter the active one (its factors and full tensors go in place)."""
    state = lie_state(model)
    named = state.adapters if state is not None else {}
    if name not in named:
        raise LieError(f"no adapter named {name!r} on this model; loaded: {', '.join(named) or 'none'}")
    if state.is_merged:
        raise LieError("the model holds merged adapters; call unmerge_ before set_adapter")
    activate_adapter(model, named[name])
    state.active_adapter = name
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block, bit for bit: adapters off, the base's own full tensors.

    Works on live adapters and on merged models (unmerged for the block, merged again after).
    """
    state = lie_state(model)
    if state is None:  # no adapters: the model is the base already
        yield model
        return
    merged = is_merged(model)
    if merged:
        unmerge_(model)
    task_full = {}
    for P, (owner, attr, _, _) in state.full_originals.items():
        task_full[P] = get_tensor(owner, attr)
    restore_full_tensors(model)
    state.enabled = False
    try:
        yield model
    finally:
        state.enabled = True
        if task_full:
            install_full_tensors(model, {P: t for P, t in task_full.items() if t is not None})
        if merged:
            merge_(model)
