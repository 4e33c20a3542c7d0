"""safetensors helpers that need torch: torch dtypes by safetensors name, tensor hashing, base files.

Header parsing lives in :mod:`liedeploy.io.safetensors_header` (no torch) and atomic outputs in
:mod:`liedeploy.io.atomic`; both are re-exported here for the modules that use all three.
"""

from __future__ import annotations

import hashlib

import torch

from liedeploy.io.atomic import atomic_path
from liedeploy.io.dtypes import DTYPE_SIZES, DTYPES, st_to_torch
from liedeploy.io.safetensors_header import SafetensorsFile, read_header, read_index, resolve_shards

__all__ = [
    "read_header",
    "SafetensorsFile",
    "tensor_sha256",
    "atomic_path",
    "ST_DTYPES",
    "DTYPE_NAMES",
    "DTYPE_SIZES",
    "resolve_shards",
    "read_index",
    "BaseTensors",
]

# safetensors dtype strings <-> torch dtypes, from the one table in liedeploy.io.dtypes
ST_DTYPES = {name: st_to_torch(name) for name in DTYPES}
DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes as stored (row-major, its own dtype)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


class BaseTensors:
    """The tensors of a base file or sharded index by name: shapes from the checked headers, values
    read on demand (one shard at a time, never unpickled), sha256 cached per name.

    Example:
        >>> base = BaseTensors("model.safetensors.index.json")
        >>> base.shapes["fc.weight"], base.get("fc.weight"), base.sha256("fc.weight")
    """

    def __init__(self, path: str):
        from liedeploy.io.safetensors_header import read_index

        self.path = str(path)
        shards = read_index(self.path)[1] if self.path.endswith(".index.json") else {self.path: None}
        self.where: dict = {}
        self.shapes: dict = {}
        self.dtypes: dict = {}  # safetensors names
        for shard in shards:
            header, _, _ = read_header(shard)
            for k, v in header.items():
                self.where[k], self.shapes[k], self.dtypes[k] = shard, tuple(v["shape"]), v["dtype"]
        self._hashes: dict = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        from liedeploy.errors import LieError

        if name not in self.where:
            raise LieError(f"{self.path}: has no tensor {name}")
        with SafetensorsFile(self.where[name]) as f, safe_open(f.fd_path, framework="pt") as st:
            return st.get_tensor(name)

    def sha256(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = tensor_sha256(self.get(name))
        return self._hashes[name]
