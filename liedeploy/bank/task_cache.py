"""Which folded tasks the bank keeps: a byte bound, the least used task evicted first.

Task popularity in serving is skewed (a few tasks take most requests, a long tail takes the rest),
and a cold task costs a fold. An LRU evicts a popular task whenever enough rare ones pass
through; here each use counts, with exponential decay (a use ``half_life`` uses ago counts half),
and the cache keeps the tasks used most:

- eviction takes the resident tasks used least (the least recently used among equals);
- admission (as in TinyLFU): a newly folded task that is used less than a task it would evict
  is served once and not kept, so one pass of a rare task does not push out a popular one.

Counts are kept for tasks seen recently whether resident or not (a float per task), so a task
that becomes popular is admitted after a few uses. ``policy="lru"`` gives a plain LRU (evict the
least recently used, admit everything), for comparison.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional

__all__ = ["TaskCache", "POLICIES"]

POLICIES = ("frequency", "lru")


class TaskCache:
    """Keys with byte sizes and decayed use counts; ``limit`` None: unbounded.

    Not thread safe: the owner holds its lock around calls.
    """

    def __init__(self, limit: Optional[int] = None, half_life: float = 1000.0, policy: str = "frequency"):
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        if policy not in POLICIES:
            raise ValueError(f"the cache policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.limit, self.policy = limit, policy
        self._sizes: OrderedDict = OrderedDict()  # resident keys, least recently used first
        self.total = 0
        self._counts: dict = {}  # key -> decayed uses x scale (every key used lately)
        self._scale = 1.0
        self._growth = 2.0 ** (1.0 / half_life)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list:
        """Resident keys from least to most recently used."""
        return list(self._sizes)

    # -- use counts ---------------------------------------------------------------------------
    def record(self, key: Hashable, uses: int = 1) -> None:
        """Count ``uses`` uses of ``key`` (resident or not); older uses decay."""
        if uses <= 0:
            return
        self._scale *= self._growth ** uses  # later uses weigh more: the same as decaying the old ones
        self._counts[key] = self._counts.get(key, 0.0) + uses * self._scale
        if self._scale > 1e100:  # renormalize; forget keys whose uses have all but decayed away
            s = self._scale
            self._counts = {k: c / s for k, c in self._counts.items() if c / s > 1e-6 or k in self._sizes}
            self._scale = 1.0

    def uses(self, key: Hashable) -> float:
        """The decayed use count of ``key`` (in uses of now)."""
        return self._counts.get(key, 0.0) / self._scale

    # -- residency ----------------------------------------------------------------------------
    def touch(self, key: Hashable) -> None:
        self._sizes.move_to_end(key)

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` can be held at all."""
        return self.limit is None or nbytes <= self.limit

    def victims(self, key: Hashable, nbytes: int, force: bool = False) -> Optional[list]:
        """The resident keys to evict so that ``key`` (``nbytes``) fits, least used first; ``None``
        when ``key`` is used less than one of them (it is not admitted: serve it once), unless ``force``."""
        need = 0 if self.limit is None else self.total + nbytes - self.limit
        if need <= 0:
            return []
        if self.policy == "lru":
            force, ranked = True, list(self._sizes)
        else:
            order = {k: i for i, k in enumerate(self._sizes)}
            ranked = sorted(self._sizes, key=lambda k: (self._counts.get(k, 0.0), order[k]))
        out = []
        for k in ranked:
            if need <= 0:
                break
            out.append(k)
            need -= self._sizes[k]
        mine = self._counts.get(key, 0.0)
        if not force and any(self._counts.get(k, 0.0) > mine for k in out):
            return None
        return out

    def put(self, key: Hashable, nbytes: int) -> None:
        """Insert (or refresh) ``key`` as most recently used; evict :meth:`victims` first."""
        self.pop(key)
        self._sizes[key] = nbytes
        self.total += nbytes

    def pop(self, key: Hashable) -> Optional[int]:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.total -= size
        return size
