"""Validating an adapter file's header and metadata, without torch (format_version "1" and "2").

:func:`parse_adapter_header` checks everything a reader must refuse that the header alone can
show (format, version, expmap, ``targets``, ``base_sha256``, ``full``, factor shapes, missing or
extra tensors); :func:`read_adapter <liedeploy.adapter_file.read_adapter>` then loads and checks
the tensor values. ``liedeploy inspect`` uses this module with numpy only, so it starts fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from liedeploy.io.dtypes import FLOAT_DTYPES, FULL_DTYPES
from liedeploy.errors import AdapterFileError

__all__ = ["FORMAT", "FORMAT_VERSIONS", "EXPMAP_NAMES", "FULL_DTYPES", "AdapterHeader", "parse_adapter_header"]

FORMAT = "liedeploy.adapter"
FORMAT_VERSIONS = ("1", "2")
EXPMAP_NAMES = ("exact", "first_order")


@dataclass
class AdapterHeader:
    """What an adapter file's header says, validated."""

    path: str
    format_version: str
    name: str
    expmap: str
    targets: dict  # {P: {"shape": tuple, "scale": float}}
    base_sha256: dict  # {P: hex}
    full: dict  # {P: {"shape": tuple, "dtype": "F32"|"F16"|"BF16"}}
    config: dict
    metadata: dict = field(default_factory=dict)


def _json_meta(path: str, metadata: dict, key: str):
    if key not in metadata:
        raise AdapterFileError(f"{path}: adapter metadata {key!r} is missing")
    try:
        return json.loads(metadata[key])
    except RecursionError:
        raise AdapterFileError(f"{path}: adapter metadata {key!r} nests too deeply") from None
    except ValueError:
        raise AdapterFileError(f"{path}: adapter metadata {key!r} is not valid JSON") from None


def _shape(path: str, where: str, P: str, raw) -> tuple:
    if not isinstance(raw, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw):
        raise AdapterFileError(f"{path}: {where} {P} has shape {raw!r}: a shape is a list of non-negative integers")
    return tuple(raw)


def parse_adapter_header(path: str, header: dict, meta: dict) -> AdapterHeader:
    """Validate a safetensors header (``tensors``, ``__metadata__``) as a liedeploy adapter.

    Raises:
        AdapterFileError: one sentence naming ``path`` and the problem.
    """
    ver, expmap = _check_format(path, meta)
    targets_raw, hashes, config, full_raw = _read_metadata(path, meta, ver)
    targets = {P: _target(path, P, info) for P, info in targets_raw.items()}
    full = {P: _full_entry(path, P, info, targets) for P, info in full_raw.items()}
    _check_tensor_names(path, header, targets, full, ver)
    _check_factors(path, header, targets, hashes)
    _check_full_tensors(path, header, full)
    name = meta.get("name", "")
    return AdapterHeader(
        path=path,
        format_version=ver,
        name=name if isinstance(name, str) and name else path.rsplit("/", 1)[-1].rsplit(".", 1)[0],
        expmap=expmap,
        targets=targets,
        base_sha256={k: v for k, v in hashes.items()},
        full=full,
        config=config if isinstance(config, dict) else {},
        metadata=dict(meta),
    )


def _check_format(path: str, meta: dict) -> tuple[str, str]:
    """``(format_version, expmap)`` after checking ``format``."""
    fmt = meta.get("format")
    if fmt is None:
        raise AdapterFileError(f"{path}: not a liedeploy adapter (metadata 'format' is missing)")
    if fmt != FORMAT:
        raise AdapterFileError(f"{path}: not a liedeploy adapter (format is {fmt!r}, expected {FORMAT!r})")
    ver = meta.get("format_version")
    if ver not in FORMAT_VERSIONS:
        raise AdapterFileError(
            f"{path}: unsupported adapter format_version {ver!r} (this liedeploy reads "
            f"{' and '.join(repr(v) for v in FORMAT_VERSIONS)})"
        )
    expmap = meta.get("expmap")
    if expmap not in EXPMAP_NAMES:
        raise AdapterFileError(f"{path}: unknown expmap {expmap!r} (expected 'exact' or 'first_order')")
    return ver, expmap


def _read_metadata(path: str, meta: dict, ver: str) -> tuple[dict, dict, dict, dict]:
    """``(targets, base_sha256, config, full)`` as JSON values of the right kinds."""
    targets_raw = _json_meta(path, meta, "targets")
    hashes = _json_meta(path, meta, "base_sha256")
    config = _json_meta(path, meta, "config") if "config" in meta else {}
    full_raw = _json_meta(path, meta, "full") if ver == "2" else {}
    if ver == "1" and "full" in meta:
        raise AdapterFileError(f"{path}: metadata 'full' needs format_version '2', the file says '1'")
    if not isinstance(targets_raw, dict):
        raise AdapterFileError(f"{path}: adapter metadata 'targets' must be a JSON object")
    if not isinstance(full_raw, dict):
        raise AdapterFileError(f"{path}: adapter metadata 'full' must be a JSON object")
    if ver == "2" and not full_raw:
        raise AdapterFileError(f"{path}: format_version '2' lists no full tensors in 'full' (write version '1' instead)")
    if not targets_raw and not full_raw:
        raise AdapterFileError(f"{path}: adapter metadata 'targets' must be a non-empty JSON object")
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise AdapterFileError(f"{path}: adapter metadata 'base_sha256' must be a JSON object of hex strings")
    return targets_raw, hashes, config, full_raw


def _target(path: str, P: str, info) -> dict:
    if not isinstance(info, dict) or "shape" not in info or "scale" not in info:
        raise AdapterFileError(f"{path}: target {P} in 'targets' needs a 'shape' list and a 'scale' number")
    shape = _shape(path, "target", P, info["shape"])
    scale = info["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise AdapterFileError(f"{path}: target {P} in 'targets' needs a 'shape' list and a 'scale' number")
    scale = float(scale)
    if len(shape) < 2 or not math.isfinite(scale):
        raise AdapterFileError(f"{path}: target {P} has shape {list(shape)} and scale {scale}: need rank >= 2 and a finite scale")
    return {"shape": shape, "scale": scale}


def _full_entry(path: str, P: str, info, targets: dict) -> dict:
    if not isinstance(info, dict) or "shape" not in info or "dtype" not in info:
        raise AdapterFileError(f"{path}: full tensor {P} in 'full' needs a 'shape' list and a 'dtype'")
    if P in targets:
        raise AdapterFileError(f"{path}: {P} is both a Lie target and a full tensor; it can only be one")
    shape = _shape(path, "full tensor", P, info["shape"])
    if info["dtype"] not in FULL_DTYPES:
        raise AdapterFileError(f"{path}: full tensor {P} has dtype {info['dtype']!r} in 'full' (expected F32, F16 or BF16)")
    return {"shape": shape, "dtype": info["dtype"]}


def _check_tensor_names(path: str, header: dict, targets: dict, full: dict, ver: str) -> None:
    expected = {f"{P}.lie_{x}" for P in targets for x in "AB"} | set(full)
    extra = sorted(set(header) - expected)
    if extra:
        what = "any target listed in 'targets'" if ver == "1" else "'targets' or 'full'"
        raise AdapterFileError(f"{path}: tensor {extra[0]} does not belong to {what}")
    missing = sorted(expected - set(header))
    if missing:
        raise AdapterFileError(f"{path}: tensor {missing[0]} is missing")


def _check_factors(path: str, header: dict, targets: dict, hashes: dict) -> None:
    for P, info in targets.items():
        m, n = info["shape"][0], math.prod(info["shape"][1:])
        hb, ha = header[f"{P}.lie_B"], header[f"{P}.lie_A"]
        bs, as_ = hb["shape"], ha["shape"]
        if len(bs) != 2 or len(as_) != 2 or bs[0] != m or as_[1] != n or bs[1] != as_[0]:
            raise AdapterFileError(
                f"{path}: factors of {P} have shapes B {list(bs)} and A {list(as_)}, which disagree with its "
                f"target shape {list(info['shape'])} (expected B [{m}, r] and A [r, {n}])"
            )
        for key, h in ((f"{P}.lie_B", hb), (f"{P}.lie_A", ha)):
            if h["dtype"] not in FLOAT_DTYPES:
                raise AdapterFileError(f"{path}: factor {key} has dtype {h['dtype']}, expected a floating-point type")
        if P not in hashes:
            raise AdapterFileError(f"{path}: 'base_sha256' has no entry for target {P}")


def _check_full_tensors(path: str, header: dict, full: dict) -> None:
    for P, info in full.items():
        h = header[P]
        if tuple(h["shape"]) != info["shape"] or h["dtype"] != info["dtype"]:
            raise AdapterFileError(
                f"{path}: full tensor {P} is stored as {h['dtype']} {list(h['shape'])}, but 'full' says "
                f"{info['dtype']} {list(info['shape'])}"
            )
