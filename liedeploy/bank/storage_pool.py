"""Reuse the storage of evicted folds for the next fold (no fresh pages to fault in)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from liedeploy.core.conv_pack import nbytes

__all__ = ["StoragePool"]


class StoragePool:
    """Free tensors by (shape, dtype, device, layout), bounded in bytes.

    Not thread safe: the owner holds its lock around calls. ``limit`` grows to the largest fold
    seen (:meth:`allow`), so at most one task's worth of storage waits here.
    """

    def __init__(self):
        self._free: dict = {}
        self.nbytes = 0
        self.limit = 0
        self.reused = 0

    def allow(self, nbytes: int) -> None:
        self.limit = max(self.limit, nbytes)

    def give(self, tensors: Iterable[torch.Tensor]) -> None:
        """Keep tensors nobody uses any more, while the bound allows."""
        for t in tensors:
            size = nbytes(t)
            if self.nbytes + size > self.limit:
                break
            self._free.setdefault(_key(t), []).append(t)
            self.nbytes += size

    def take(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        """A free tensor with ``like``'s shape, dtype, device and layout (packed or not), or None."""
        free = self._free.get(_key(like))
        if not free:
            return None
        t = free.pop()
        self.nbytes -= nbytes(t)
        self.reused += 1
        return t


def _key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device, t.layout
