"""Describe adapter, base and merged safetensors files (used by ``liedeploy inspect``)."""

from __future__ import annotations

import json
import math
import os

from .adapter_file import FORMAT, read_adapter
from .errors import AdapterFileError
from .sfile import read_header

__all__ = ["describe_file"]


def _describe_adapter(path: str) -> dict:
    af = read_adapter(path)
    targets = []
    for P in sorted(af.targets):
        B, A = af.factors[P]
        targets.append(
            {
                "name": P,
                "shape": list(af.targets[P]["shape"]),
                "rank": af.rank(P),
                "scale": af.targets[P]["scale"],
                "parameters": B.numel() + A.numel(),
            }
        )
    dtypes = sorted({str(B.dtype).replace("torch.", "") for B, _ in af.factors.values()})
    return {
        "path": path,
        "kind": "adapter",
        "size_bytes": os.path.getsize(path),
        "name": af.name,
        "expmap": af.expmap,
        "format_version": af.metadata.get("format_version"),
        "created_by": af.metadata.get("created_by", "?"),
        "config": af.config,
        "num_parameters": af.num_parameters,
        "factor_dtype": ",".join(dtypes),
        "targets": targets,
    }


def describe_file(path: str) -> dict:
    """A JSON-able description of an adapter file, a safetensors weight file or a sharded index."""
    path = os.fspath(path)
    if path.endswith(".index.json"):
        from .sfile import resolve_shards

        shards = resolve_shards(path)
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
    header, meta, _ = read_header(path)
    if meta.get("format") == FORMAT:
        return _describe_adapter(path)
    dtypes: dict = {}
    for v in header.values():
        dtypes[v["dtype"]] = dtypes.get(v["dtype"], 0) + 1
    info = {
        "path": path,
        "kind": "weights",
        "size_bytes": os.path.getsize(path),
        "num_tensors": len(header),
        "num_elements": sum(math.prod(v["shape"]) for v in header.values()),
        "dtypes": dtypes,
        "metadata": meta,
    }
    if "liedeploy.merged_from" in meta:
        info["kind"] = "merged weights"
        try:
            info["merged_from"] = json.loads(meta["liedeploy.merged_from"])
        except ValueError:
            raise AdapterFileError(f"{path}: metadata liedeploy.merged_from is not valid JSON") from None
    return info
