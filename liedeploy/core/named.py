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

from liedeploy.core.adapt import iter_adapters
from liedeploy.errors import LieError

__all__ = ["set_adapter", "disable_adapters", "active_adapter", "list_adapters"]


def list_adapters(model: nn.Module) -> list:
    """Names of the adapters loaded with ``load_adapter(..., adapter_name=...)``."""
    return list(getattr(model, "lie_adapters", None) or {})


def active_adapter(model: nn.Module):
    return getattr(model, "lie_active_adapter", None)


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make the named adapter the active one (its factors and full tensors go in place)."""
    from liedeploy.core.adapter_file import _activate

    named = getattr(model, "lie_adapters", None) or {}
    if name not in named:
        raise LieError(f"no adapter named {name!r} on this model; loaded: {', '.join(named) or 'none'}")
    if getattr(model, "_lie_merged", None):
        raise LieError("the model holds merged adapters; call unmerge_ before set_adapter")
    _activate(model, named[name])
    model.lie_active_adapter = name
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block, bit for bit: adapters off, the base's own full tensors.

    Works on live adapters and on merged models (unmerged for the block, merged again after).
    """
    from liedeploy.core.adapter_file import install_full_tensors
    from liedeploy.core.merge import is_merged, merge_, unmerge_

    merged = is_merged(model)
    if merged:
        unmerge_(model)
    lies = [lie for _, _, _, lie in iter_adapters(model)]
    originals = dict(getattr(model, "lie_full_originals", None) or {})
    task_full = {}
    for P in originals:
        mod, _, attr = P.rpartition(".")
        owner = model.get_submodule(mod) if mod else model
        task_full[P] = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    from liedeploy.core.full_tensors import restore_full_tensors

    restore_full_tensors(model)
    for lie in lies:
        lie.enabled = False
    try:
        yield model
    finally:
        for lie in lies:
            lie.enabled = True
        if task_full:
            install_full_tensors(model, {P: t for P, t in task_full.items() if t is not None})
        if merged:
            merge_(model)
