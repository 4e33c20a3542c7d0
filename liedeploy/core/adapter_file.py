"""Adapter files, format_version "1": save, read (validated), load into a model.

One ``.safetensors`` file per task. For each adapted parameter ``P`` (its ``state_dict`` name):
``P.lie_B`` (shape[0], r) and ``P.lie_A`` (r, prod(shape[1:])); header metadata ``format``,
``format_version``, ``expmap``, ``targets``, ``base_sha256``, ``config``, ``name``, ``created_by``.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file
from torch import nn

from liedeploy._version import __version__
from liedeploy.core.adapt import apply_adapters_, iter_adapters, remove_adapters_
from liedeploy.io.adapter_header import FORMAT, parse_adapter_header
from liedeploy.core.full_tensors import full_tensors, install_full_tensors, restore_full_tensors
from liedeploy.core.config import LieConfig
from liedeploy.errors import AdapterFileError, LieError
from liedeploy.io.safetensors_io import DTYPE_NAMES, SafetensorsFile, atomic_path, tensor_sha256

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "AdapterFile",
    "save_adapter",
    "read_adapter",
    "load_adapter",
    "check_against_base",
    "pristine_base_tensors",
    "full_tensors",
    "install_full_tensors",
    "restore_full_tensors",
]

FORMAT_VERSION = "1"  # what save_adapter writes when a task has no full tensors


@dataclass
class AdapterFile:
    """A validated adapter file in memory."""

    path: str
    name: str
    expmap: str
    targets: dict  # {P: {"shape": tuple, "scale": float}}
    factors: dict  # {P: (B, A)}
    base_sha256: dict  # {P: hex}
    config: dict
    metadata: dict = field(default_factory=dict)
    full: dict = field(default_factory=dict)  # {P: tensor} replaced whole (format_version "2")
    format_version: str = "1"
    file_sha256: str = ""

    def rank(self, target: str) -> int:
        return int(self.factors[target][0].shape[1])

    @property
    def num_parameters(self) -> int:
        return sum(B.numel() + A.numel() for B, A in self.factors.values())


def pristine_base_tensors(model: nn.Module) -> dict:
    """``{P: pristine base tensor}`` for every adapted parameter of ``model`` (live or merged)."""
    out = {P: module.parametrizations[attr].original for P, module, attr, _ in iter_adapters(model)}
    for P, rec in getattr(model, "_lie_merged", {}).items():
        out[P] = rec.pristine()
    return out


def _live_factors(model: nn.Module) -> dict:
    out = {P: (lie.lie_B, lie.lie_A, lie.scale, lie.expmap) for P, _, _, lie in iter_adapters(model)}
    for P, rec in getattr(model, "_lie_merged", {}).items():
        out[P] = (rec.B, rec.A, rec.scale, rec.expmap)
    return out


def save_adapter(
    model: nn.Module,
    path: str,
    name: Optional[str] = None,
    *,
    factors: Optional[dict] = None,
    base: Optional[dict] = None,
) -> str:
    """Write the model's Lie adapters to ``path`` (adapter format_version "1").

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
    expmaps = {e for *_, e in live.values()}
    if len(expmaps) > 1:
        raise LieError(f"the model mixes exp maps {sorted(expmaps)}; one adapter file holds one map")
    cfg = getattr(model, "lie_config", None)
    if not expmaps:
        expmaps = {cfg.expmap if isinstance(cfg, LieConfig) else "exact"}
    base = base if base is not None else pristine_base_tensors(model)
    tensors, targets, hashes = {}, {}, {}
    for P in sorted(live):
        B, A, scale, _ = live[P]
        if factors is not None:
            B, A = factors[P]
        tensors[f"{P}.lie_B"] = B.detach().to("cpu", copy=True).contiguous()
        tensors[f"{P}.lie_A"] = A.detach().to("cpu", copy=True).contiguous()
        targets[P] = {"shape": list(base[P].shape), "scale": float(scale)}
        hashes[P] = tensor_sha256(base[P])
    for P, t in full.items():
        if P in targets:
            raise LieError(f"{P} is both a Lie target and a module to save; it can only be one")
        tensors[P] = t.detach().to("cpu", copy=True).contiguous()
    name = name if name is not None else os.path.splitext(os.path.basename(path))[0]
    metadata = {
        "format": FORMAT,
        "format_version": "2" if full else FORMAT_VERSION,
        "expmap": expmaps.pop(),
        "targets": json.dumps(targets, sort_keys=True),
        "base_sha256": json.dumps(hashes, sort_keys=True),
        "config": cfg.to_json() if isinstance(cfg, LieConfig) else json.dumps(cfg or {}),
        "name": str(name),
        "created_by": f"liedeploy {__version__}",
    }
    kinds = {P: type(m).__name__.replace("Parametrized", "") for P, m, _, _ in iter_adapters(model)}
    kinds.update({P: type(rec.module).__name__.replace("Parametrized", "") for P, rec in getattr(model, "_lie_merged", {}).items()})
    metadata["layer_types"] = json.dumps({P: k for P, k in kinds.items() if P in targets}, sort_keys=True)
    if full:
        metadata["full"] = json.dumps({P: {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]} for P, t in full.items()},
                                      sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def read_adapter(path: str, device: str | torch.device = "cpu") -> AdapterFile:
    """Read and validate an adapter file (format_version "1" or "2") without any model.

    The file is read once, through one descriptor. Refuses (:class:`AdapterFileError`, one
    sentence naming the file): a pickle or other non-safetensors file, a special file, a
    malformed or truncated header, a missing or unknown format/version/expmap, factors whose
    shapes disagree with ``targets``, full tensors that disagree with ``full``, missing or extra
    tensors, non-finite values.
    """
    path = os.fspath(path)
    with SafetensorsFile(path) as f:
        info = parse_adapter_header(path, f.header, f.metadata)
        data = f.read_all()
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors' own parser; the header was checked above
        raise AdapterFileError(f"{path}: unreadable safetensors data ({str(exc).splitlines()[0]})") from None
    for key in sorted(tensors):
        if not torch.isfinite(tensors[key]).all():
            kind = "full tensor" if key in info.full else "factor"
            raise AdapterFileError(f"{path}: {kind} {key} holds non-finite values (NaN or inf)")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return AdapterFile(
        path=path,
        name=info.name,
        expmap=info.expmap,
        targets=info.targets,
        factors={P: (tensors[f"{P}.lie_B"], tensors[f"{P}.lie_A"]) for P in info.targets},
        base_sha256=info.base_sha256,
        config=info.config,
        metadata=info.metadata,
        full={P: tensors[P] for P in info.full},
        format_version=info.format_version,
        file_sha256=hashlib.sha256(data).hexdigest(),
    )


def check_against_base(
    adapter: AdapterFile,
    shapes: Mapping[str, tuple],
    sha256: Optional[Callable[[str], str]] = None,
) -> None:
    """Refuse an adapter whose targets are absent from a base, have other shapes, or other bytes.

    Args:
        adapter: a read adapter.
        shapes: ``{name: shape}`` of the base tensors.
        sha256: ``name -> hex digest`` of the base tensor; ``None`` skips the hash check.
    """
    path = adapter.path
    for P, info in adapter.targets.items():
        if P not in shapes:
            raise AdapterFileError(f"{path}: target {P} is absent from the base")
        if tuple(shapes[P]) != tuple(info["shape"]):
            raise AdapterFileError(
                f"{path}: target {P} has shape {list(info['shape'])} but the base tensor has shape {list(shapes[P])}"
            )
    if sha256 is not None:
        for P in adapter.targets:
            got = sha256(P)
            want = adapter.base_sha256[P]
            if got != want:
                raise AdapterFileError(
                    f"{path}: base tensor {P} differs from the one this adapter was trained on "
                    f"(sha256 {got[:12]}... vs {want[:12]}...); it was made for another base"
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
    if getattr(model, "_lie_merged", None):
        raise LieError("the model holds merged adapters; call unmerge_ before loading another adapter")
    af = path if isinstance(path, AdapterFile) else read_adapter(path)
    base = _base_view(model)
    check_against_base(
        af,
        {k: tuple(v.shape) for k, v in base.items()},
        (lambda P: _cached_sha256(base[P])) if verify_base else None,
    )
    if adapter_name is not None:
        named = getattr(model, "lie_adapters", None)
        if named is None:
            named = model.lie_adapters = {}
        named[adapter_name] = af
        if getattr(model, "lie_active_adapter", None) is not None:
            return model  # kept; set_adapter(model, adapter_name) activates it
        model.lie_active_adapter = adapter_name
    return _activate(model, af)


def _activate(model: nn.Module, af: AdapterFile) -> nn.Module:
    restore_full_tensors(model)  # the previous task's head, if any, gives way to the base's
    live = {P: lie for P, _, _, lie in iter_adapters(model)}
    same = set(live) == set(af.targets) and all(
        live[P].r == af.rank(P) for P in af.targets
    )
    if not same:
        if live:
            remove_adapters_(model)
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
    if af.full:
        install_full_tensors(model, af.full, path=af.path)
        model.lie_modules_to_save = sorted({P.rpartition(".")[0] for P in af.full})
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
