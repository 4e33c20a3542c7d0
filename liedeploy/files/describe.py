"""Describe adapter, base and merged safetensors files (``liedeploy inspect``), without torch.

Headers are parsed strictly (:mod:`liedeploy.safetensors_header`), adapter metadata is validated
as a reader would (:mod:`liedeploy.adapter_header`) and tensor values are checked with numpy.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from liedeploy.io.adapter_header import FORMAT, parse_adapter_header
from liedeploy.io.dtypes import FLOAT_DTYPES, numpy_storage, torch_name
from liedeploy.errors import AdapterFileError
from liedeploy.io.safetensors_header import SafetensorsFile

__all__ = ["describe_file", "weight_sparsity"]



def _array(f: SafetensorsFile, info: dict) -> np.ndarray:
    b0, b1 = info["data_offsets"]
    buf = np.empty(b1 - b0, dtype=np.uint8)
    if b1 > b0:
        f.read_into(b0, buf)
    return buf.view(numpy_storage(info["dtype"])).reshape(info["shape"])


def _finite(a: np.ndarray, dtype: str) -> bool:
    if dtype == "BF16":  # exponent bits all ones = inf or NaN
        return not bool(np.any((a & 0x7F80) == 0x7F80))
    return bool(np.isfinite(a).all())


def _describe_adapter(f: SafetensorsFile) -> dict:
    path = f.path
    info = parse_adapter_header(path, f.header, f.metadata)
    for key, h in f.header.items():
        if not _finite(_array(f, h), h["dtype"]):
            kind = "full tensor" if key in info.full else "factor"
            raise AdapterFileError(f"{path}: {kind} {key} holds non-finite values (NaN or inf)")
    targets = []
    for P in sorted(info.targets):
        hb, ha = f.header[f"{P}.lie_B"], f.header[f"{P}.lie_A"]
        targets.append(
            {
                "name": P,
                "shape": list(info.targets[P]["shape"]),
                "rank": hb["shape"][1],
                "scale": info.targets[P]["scale"],
                "parameters": math.prod(hb["shape"]) + math.prod(ha["shape"]),
            }
        )
    full = [{"name": P, "shape": list(v["shape"]), "dtype": v["dtype"], "parameters": math.prod(v["shape"])}
            for P, v in sorted(info.full.items())]
    factor_dtypes = sorted({f.header[k]["dtype"] for P in info.targets for k in (f"{P}.lie_B", f"{P}.lie_A")})
    return {
        "path": path,
        "kind": "adapter",
        "size_bytes": f.size,
        "name": info.name,
        "expmap": info.expmap,
        "format_version": info.format_version,
        "created_by": info.metadata.get("created_by", "?"),
        "config": info.config,
        "num_parameters": sum(t["parameters"] for t in targets) + sum(t["parameters"] for t in full),
        "factor_dtype": ",".join(torch_name(d) for d in factor_dtypes),
        "targets": targets,
        "full": full,
    }




def weight_sparsity(a: np.ndarray, dtype: str, n: int = 2, m: int = 4) -> dict:
    """Zeros of a weight tensor and whether it is N:M sparse along its reduction axis."""
    from liedeploy.files.sparsity import nm_conforms, zero_mask

    zeros = zero_mask(a, dtype)
    return {"zeros": int(zeros.sum()), "elements": int(a.size), f"{n}:{m}": nm_conforms(zeros, n, m) if a.size else False}


def _describe_weights(f: SafetensorsFile, *, sparsity: bool = True) -> dict:
    dtypes: dict = {}
    for v in f.header.values():
        dtypes[v["dtype"]] = dtypes.get(v["dtype"], 0) + 1
    info = {
        "path": f.path,
        "kind": "weights",
        "size_bytes": f.size,
        "num_tensors": len(f.header),
        "num_elements": sum(math.prod(v["shape"]) for v in f.header.values()),
        "dtypes": dtypes,
        "metadata": f.metadata,
    }
    if "liedeploy.merged_from" in f.metadata:
        info["kind"] = "merged weights"
        try:
            info["merged_from"] = json.loads(f.metadata["liedeploy.merged_from"])
        except (ValueError, RecursionError):
            raise AdapterFileError(f"{f.path}: metadata liedeploy.merged_from is not valid JSON") from None
    if sparsity:
        per, zeros, elements, conform = {}, 0, 0, True
        for name, h in f.header.items():
            if h["dtype"] not in FLOAT_DTYPES or len(h["shape"]) < 2:
                continue
            s = weight_sparsity(_array(f, h), h["dtype"])
            per[name] = {"sparsity": s["zeros"] / max(s["elements"], 1), "2:4": s.get("2:4", False)}
            zeros += s["zeros"]
            elements += s["elements"]
            conform &= s.get("2:4", False)
        info["sparsity"] = {"weights": per, "total": zeros / max(elements, 1), "all_2:4": bool(per) and conform}
    return info


def describe_file(path: str) -> dict:
    """A JSON-able description of an adapter file, a safetensors weight file or a sharded index."""
    path = os.fspath(path)
    if path.endswith(".index.json"):
        from liedeploy.io.safetensors_header import read_index

        _, shards = read_index(path)
        info = {"path": path, "kind": "sharded weights", "size_bytes": 0, "shards": len(shards),
                "num_tensors": 0, "num_elements": 0, "dtypes": {}, "metadata": {}}
        for shard in shards:
            sub = describe_file(shard)
            info["size_bytes"] += sub["size_bytes"]
            info["num_tensors"] += sub["num_tensors"]
            info["num_elements"] += sub["num_elements"]
            for k, v in sub["dtypes"].items():
                info["dtypes"][k] = info["dtypes"].get(k, 0) + v
            info["metadata"].update(sub["metadata"])
        if "liedeploy.merged_from" in info["metadata"]:
            info["kind"] = "merged sharded weights"
            info["merged_from"] = json.loads(info["metadata"]["liedeploy.merged_from"])
        return info
    with SafetensorsFile(path) as f:
        if f.metadata.get("format") == FORMAT:
            return _describe_adapter(f)
        return _describe_weights(f)
