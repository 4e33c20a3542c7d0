"""An LRU over keys with sizes, bounded in bytes (the bank's cache of folded tasks)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional

__all__ = ["ByteLRU"]


class ByteLRU:
    """Keys with byte sizes, least recently used first; ``limit`` None: unbounded.

    Not thread safe: the owner holds its lock around calls.
    """

    def __init__(self, limit: Optional[int] = None):
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self._sizes: OrderedDict = OrderedDict()
        self.total = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list:
        """Keys from least to most recently used."""
        return list(self._sizes)

    def touch(self, key: Hashable) -> None:
        self._sizes.move_to_end(key)

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` can be held at all."""
        return self.limit is None or nbytes <= self.limit

    def make_room(self, nbytes: int) -> list:
        """Evict least recently used keys until ``nbytes`` more fit; returns the evicted keys."""
        out = []
        if self.limit is None:
            return out
        while self._sizes and self.total + nbytes > self.limit:
            key, size = self._sizes.popitem(last=False)
            self.total -= size
            out.append(key)
        return out

    def put(self, key: Hashable, nbytes: int) -> None:
        """Insert (or refresh) ``key`` as most recently used; call :meth:`make_room` first."""
        self.pop(key)
        self._sizes[key] = nbytes
        self.total += nbytes

    def pop(self, key: Hashable) -> Optional[int]:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.total -= size
        return size
