"""The adapter file format (normative; the README's "Adapter files"): read and validate a file, check it against a
base, and write one. The only writer of adapter metadata: :func:`save_adapter` and
``convert --from-peft`` both go through :func:`write_adapter_file`.

One ``.safetensors`` file per task. For each adapted parameter ``P`` (its ``state_dict`` name):
``P.lie_B`` (shape[0], r) and ``P.lie_A`` (r, prod(shape[1:])); header metadata ``format``,
``format_version``, ``expmap``, ``targets``, ``base_sha256``, ``config``, ``name``, ``created_by``
(and ``full`` for format "2": tensors a task replaces whole).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file

from liedeploy._version import __version__
from liedeploy.errors import AdapterFileError
from liedeploy.io.adapter_header import FORMAT, parse_adapter_header
from liedeploy.io.atomic import atomic_path
from liedeploy.io.dtypes import DTYPE_SIZES, FLOAT_DTYPES, st_to_torch, torch_to_st
from liedeploy.io.safetensors_header import SafetensorsFile

__all__ = ["FORMAT", "FORMAT_VERSION", "AdapterFile", "read_adapter", "check_against_base", "write_adapter_file"]

FORMAT_VERSION = "1"  # what the writer writes when a task has no full tensors


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


def read_adapter(path: str, device: str | torch.device = "cpu", *, identity: Optional[tuple] = None,
                 verified: bool = False, file_hash: bool = True) -> AdapterFile:
    """Read and validate an adapter file (format_version "1" or "2") without any model.

    The file is read once, through one descriptor. Refuses (:class:`AdapterFileError`, one
    sentence naming the file): a pickle or other non-safetensors file, a special file, a
    malformed or truncated header, a missing or unknown format/version/expmap, factors whose
    shapes disagree with ``targets``, full tensors that disagree with ``full``, missing or extra
    tensors, non-finite values.

    ``identity``: the ``(device, inode, size, mtime)`` the file must still have (a replaced file is
    refused). ``verified``: its values were already checked finite at that identity (a bank that
    reads a task's factors again at each fold skips the scan). ``file_hash=False`` leaves
    ``file_sha256`` empty (a bank's folds do not need it; a merge records it as provenance).
    """
    path = os.fspath(path)
    with SafetensorsFile(path) as f:
        if identity is not None and f.identity != identity:
            raise AdapterFileError(f"{path}: the file was replaced or changed since it was registered; load it again "
                                   "(POST /v2/repository/models/<task>/load, or bank.add(..., replace=True))")
        info = parse_adapter_header(path, f.header, f.metadata)
        raw = torch.empty(f.size, dtype=torch.uint8)  # the whole file, read once, no copy after
        f.read_into(-f.data_start, raw.numpy())
        tensors = _tensor_views(raw, f.data_start, f.header)
    if not verified:
        _check_finite_values(path, raw, f.data_start, tensors, f.header, info)
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
        file_sha256=hashlib.sha256(raw.numpy()).hexdigest() if file_hash else "",
    )


def _tensor_views(raw: torch.Tensor, data_start: int, header: dict) -> dict:
    """``{name: tensor}`` viewing ``raw`` (a whole safetensors file) by the checked header; a tensor
    whose offset does not suit its dtype's alignment gets its own aligned copy."""
    tensors = {}
    for key, e in header.items():
        b0, b1 = e["data_offsets"]
        dtype = st_to_torch(e["dtype"])
        chunk = raw[data_start + b0: data_start + b1]
        if (data_start + b0) % DTYPE_SIZES[e["dtype"]]:
            chunk = chunk.clone()
        tensors[key] = chunk.view(dtype).view(tuple(e["shape"]))
    return tensors


def _check_finite_values(path: str, raw: torch.Tensor, data_start: int, tensors: dict, header: dict, info) -> None:
    """Refuse non-finite values, scanning each run of adjacent same-dtype tensors of ``raw`` in one pass."""
    runs: list = []  # [dtype, first byte, end byte, keys]
    for key in sorted(tensors, key=lambda k: header[k]["data_offsets"][0]):
        dt = header[key]["dtype"]
        b0, b1 = header[key]["data_offsets"]
        if runs and runs[-1][0] == dt and runs[-1][2] == b0:
            runs[-1][2] = b1
            runs[-1][3].append(key)
        else:
            runs.append([dt, b0, b1, [key]])
    for dt, b0, b1, keys in runs:
        if dt not in FLOAT_DTYPES:
            continue
        size = DTYPE_SIZES[dt]
        if (data_start + b0) % size == 0 and (b1 - b0) % size == 0:
            values = raw[data_start + b0: data_start + b1].view(st_to_torch(dt))
            if dt == "F64":
                bad = not bool(torch.isfinite(values).all())
            else:  # a float64 sum of these values cannot overflow: it is finite iff every value is
                bad = not math.isfinite(float(values.sum(dtype=torch.float64)))
        else:
            bad = True  # unaligned: tensor by tensor below
        if bad:
            for key in keys:
                if not torch.isfinite(tensors[key]).all():
                    kind = "full tensor" if key in info.full else "factor"
                    raise AdapterFileError(f"{path}: {kind} {key} holds non-finite values (NaN or inf)")


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


def write_adapter_file(
    path: str,
    factors: Mapping[str, tuple],
    *,
    targets: Mapping[str, dict],
    base_sha256: Mapping[str, str],
    expmap: str,
    config_json: str,
    name: str,
    layer_types: Optional[Mapping[str, str]] = None,
    full: Optional[Mapping[str, torch.Tensor]] = None,
    created_by: Optional[str] = None,
    inputs: Sequence[str] = (),
    extra_metadata: Optional[Mapping[str, str]] = None,
) -> str:
    """Write one adapter file (format "1", or "2" when ``full`` is not empty), atomically.

    Args:
        path: the output file; written to a temporary file and renamed.
        factors: ``{P: (B, A)}``.
        targets: ``{P: {"shape": [...], "scale": float}}``.
        base_sha256: ``{P: hex}`` of each target's base tensor.
        expmap: ``"exact"`` or ``"first_order"``.
        config_json: the JSON of the :class:`~liedeploy.core.config.LieConfig` used.
        name: the task name stored in the file.
        layer_types: ``{P: layer kind}`` (``Linear``, ``Conv1D``...), used by ``convert --to-peft``.
        full: ``{P: tensor}`` the task replaces whole.
        created_by: defaults to ``liedeploy <version>``.
        inputs: files the output must not overwrite (refused in one sentence).
        extra_metadata: further string metadata (e.g. ``peft``: where a converted adapter came from);
            it cannot replace a key of the format.

    Returns:
        ``path``.
    """
    full = dict(full or {})
    both = sorted(set(full) & set(targets))
    if both:
        raise AdapterFileError(f"{both[0]} is both a Lie target and a module to save; it can only be one")
    tensors = {}
    for P in sorted(targets):
        B, A = factors[P]
        tensors[f"{P}.lie_B"] = B.detach().to("cpu", copy=True).contiguous()
        tensors[f"{P}.lie_A"] = A.detach().to("cpu", copy=True).contiguous()
    for P, t in full.items():
        tensors[P] = t.detach().to("cpu", copy=True).contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": "2" if full else FORMAT_VERSION,
        "expmap": expmap,
        "targets": json.dumps({P: {"shape": list(v["shape"]), "scale": float(v["scale"])} for P, v in targets.items()},
                              sort_keys=True),
        "base_sha256": json.dumps(dict(base_sha256), sort_keys=True),
        "config": config_json,
        "name": str(name),
        "created_by": created_by or f"liedeploy {__version__}",
        "layer_types": json.dumps({P: k for P, k in (layer_types or {}).items() if P in targets}, sort_keys=True),
    }
    for k, v in (extra_metadata or {}).items():
        if k not in metadata and k != "full":
            metadata[k] = str(v)
    if full:
        metadata["full"] = json.dumps({P: {"shape": list(t.shape), "dtype": torch_to_st(t.dtype)} for P, t in full.items()},
                                      sort_keys=True)
    with atomic_path(path, inputs=list(inputs)) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path
