"""Adapter files and live models: ``save_adapter`` writes a model's adapters, ``load_adapter`` puts a
file's adapters (and full tensors) on a model. The file format itself (reading, validating,
writing) is :mod:`liedeploy.io.adapter_format`.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
from torch import nn

from liedeploy.core.adapt import apply_adapters_, iter_adapters, unregister
from liedeploy.core.config import LieConfig
from liedeploy.core.full_tensors import full_tensors, install_full_tensors, restore_full_tensors
from liedeploy.core.state import ensure_state, lie_state
from liedeploy.errors import LieError
from liedeploy.io.adapter_format import (
    FORMAT,
    FORMAT_VERSION,
    AdapterFile,
    check_against_base,
    read_adapter,
    write_adapter_file,
)
from liedeploy.io.safetensors_io import tensor_sha256

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "AdapterFile",
    "save_adapter",
    "read_adapter",
    "load_adapter",
    "activate_adapter",
    "check_against_base",
    "pristine_base_tensors",
]


def _merged(model: nn.Module) -> dict:
    state = lie_state(model)
    return state.merged if state is not None else {}


def pristine_base_tensors(model: nn.Module) -> dict:
    """``{P: pristine base tensor}`` for every adapted parameter of ``model`` (live or merged)."""
    out = {P: module.parametrizations[attr].original for P, module, attr, _ in iter_adapters(model)}
    for P, rec in _merged(model).items():
        if rec.kept is None:
            raise LieError("merge_ was called with keep_base=False: pass the base file to unmerge_(model, base=...)")
        out[P] = rec.kept
    return out


def _live_factors(model: nn.Module) -> dict:
    """``{P: (B, A, scale, expmap, layer kind)}`` of every adapter, live or merged."""
    out = {P: (lie.lie_B, lie.lie_A, lie.scale, lie.expmap, type(m).__name__) for P, m, _, lie in iter_adapters(model)}
    for P, rec in _merged(model).items():
        out[P] = (rec.B, rec.A, rec.scale, rec.expmap, type(rec.module).__name__)
    return out


def save_adapter(
    model: nn.Module,
    path: str,
    name: Optional[str] = None,
    *,
    factors: Optional[dict] = None,
    base: Optional[dict] = None,
) -> str:
    """Write the model's Lie adapters to ``path`` (format "1", or "2" with full tensors).

    Args:
        model: a model prepared with :func:`apply_adapters_` (live or merged with ``merge_``).
        path: output ``.safetensors`` path; written to a temporary file and renamed.
        name: the task name stored in the file (default: the file's stem).
        factors, base: ``{P: (B, A)}`` and ``{P: base tensor}`` to write instead of the model's own
            (used by ``save_adapter_distributed`` with factors gathered from all ranks).

    Returns:
        ``path``.

    Example:
        >>> save_adapter(model, "rotated.safetensors", name="rotated")
    """
    live = _live_factors(model)
    full = full_tensors(model)
    if not live and not full:
        raise LieError("the model has no Lie adapters to save; call apply_adapters_ first")
    expmaps = {v[3] for v in live.values()}
    if len(expmaps) > 1:
        raise LieError(f"the model mixes exp maps {sorted(expmaps)}; one adapter file holds one map")
    state = lie_state(model)
    cfg = state.config if state is not None else None
    if not expmaps:
        expmaps = {cfg.expmap if isinstance(cfg, LieConfig) else "exact"}
    base = base if base is not None else pristine_base_tensors(model)
    both = sorted(set(full) & set(live))
    if both:
        raise LieError(f"{both[0]} is both a Lie target and a module to save; it can only be one")
    written = {P: (factors[P] if factors is not None else live[P][:2]) for P in live}
    return write_adapter_file(
        path,
        written,
        targets={P: {"shape": list(base[P].shape), "scale": float(live[P][2])} for P in live},
        base_sha256={P: tensor_sha256(base[P]) for P in live},
        expmap=expmaps.pop(),
        config_json=cfg.to_json() if isinstance(cfg, LieConfig) else LieConfig(expmap="exact").to_json(),
        name=name if name is not None else os.path.splitext(os.path.basename(path))[0],
        layer_types={P: v[4].replace("Parametrized", "") for P, v in live.items()},
        full=full,
    )


def _base_view(model: nn.Module) -> dict:
    """``{P: pristine tensor}`` for all parameters and buffers of ``model`` under base names."""
    out = {}
    live = pristine_base_tensors(model)
    # keys of the Lie parametrizations themselves (originals, factors); other parametrizations
    # (weight_norm's original0/original1...) are base tensors under their own names
    internal = tuple(f"{P[: len(P) - len(P.rpartition('.')[2])]}parametrizations.{P.rpartition('.')[2]}." for P in live)
    for k, v in model.state_dict(keep_vars=True).items():
        if internal and k.startswith(internal):
            continue
        out[k] = v
    out.update(live)
    return out


_SHA256: dict = {}  # id(base tensor) -> (weakref, (data_ptr, version), hex)


def _cached_sha256(t: torch.Tensor) -> str:
    """sha256 of a base tensor, remembered while the tensor lives and is not modified in place."""
    key = (t.data_ptr(), t._version)
    hit = _SHA256.get(id(t))
    if hit is None or hit[0]() is not t or hit[1] != key:
        ident = id(t)
        ref = weakref.ref(t, lambda _, ident=ident: _SHA256.pop(ident, None))
        hit = (ref, key, tensor_sha256(t))
        _SHA256[ident] = hit
    return hit[2]


def load_adapter(model: nn.Module, path, *, verify_base: bool = True, adapter_name: Optional[str] = None) -> nn.Module:
    """Load an adapter file into ``model`` and return it.

    If the model already has Lie adapters on exactly the file's targets and ranks, the factors are
    copied in place (no new tensors: compiled graphs and CUDA graphs keep working). Otherwise any
    existing adapters are removed and the file's adapters are attached. Full tensors (format "2":
    a head of the task's own) are installed, shapes included; the base's are kept to restore.

    Args:
        model: the base architecture (with pristine base weights).
        path: an adapter file (or an :class:`AdapterFile` already read).
        verify_base: check every target's base tensor against the file's ``base_sha256``.
        adapter_name: keep the adapter under this name (PEFT's ``adapter_name``): several named
            adapters live on one model and :func:`liedeploy.named.set_adapter` switches between them.
            The first one loaded is active; later ones wait for ``set_adapter``.

    Raises:
        AdapterFileError: see :func:`read_adapter`, plus targets absent from the model, other
            shapes, or base tensors whose hash differs.
    """
    if _merged(model):
        raise LieError("the model holds merged adapters; call unmerge_ before loading another adapter")
    af = path if isinstance(path, AdapterFile) else read_adapter(path)
    base = _base_view(model)
    check_against_base(
        af,
        {k: tuple(v.shape) for k, v in base.items()},
        (lambda P: _cached_sha256(base[P])) if verify_base else None,
    )
    if adapter_name is not None:
        state = ensure_state(model)
        state.adapters[adapter_name] = af
        if state.active_adapter is not None:
            return model  # kept; set_adapter(model, adapter_name) activates it
        state.active_adapter = adapter_name
    return activate_adapter(model, af)


def activate_adapter(model: nn.Module, af: AdapterFile) -> nn.Module:
    """Put a read adapter's factors and full tensors on ``model`` (in place when the targets and
    ranks are those of the live adapters; otherwise the live ones give way). Named adapters and
    the active name are kept."""
    restore_full_tensors(model)  # the previous task's head, if any, gives way to the base's
    live = {P: lie for P, _, _, lie in iter_adapters(model)}
    same = set(live) == set(af.targets) and all(
        live[P].r == af.rank(P) for P in af.targets
    )
    if not same:
        for _, module, attr, _ in list(iter_adapters(model)):
            unregister(module, attr)
        try:
            cfg = LieConfig.from_dict(af.config)
        except (TypeError, ValueError):
            cfg = LieConfig(r=af.rank(next(iter(af.targets))) if af.targets else 8, expmap=af.expmap,
                            targets=sorted(af.targets) or None, filter_fn=lambda m, n: False)
        if cfg.expmap != af.expmap:
            cfg = LieConfig(r=cfg.r, alpha=cfg.alpha, expmap=af.expmap, targets=sorted(af.targets) or None,
                            filter_fn=lambda m, n: False)
        exact = {P: (af.rank(P), af.targets[P]["scale"]) for P in af.targets}
        apply_adapters_(model, cfg, targets_exact=exact)
        live = {P: lie for P, _, _, lie in iter_adapters(model)}
    state = ensure_state(model)
    state.modules_to_save = sorted({P.rpartition(".")[0] for P in af.full})
    if af.full:
        install_full_tensors(model, af.full, path=af.path)
    with torch.no_grad():
        for P, (B, A) in af.factors.items():
            lie = live[P]
            lie.lie_B.copy_(B)
            lie.lie_A.copy_(A)
            # attributes are only written when they change: compiled graphs guard on them
            if lie.scale != af.targets[P]["scale"]:
                lie.scale = af.targets[P]["scale"]
            if lie.expmap != af.expmap:
                lie.expmap = af.expmap
    return model
