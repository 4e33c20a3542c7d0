"""Progress bars: shown on a terminal, silent when piped."""

from __future__ import annotations

import sys
from typing import Iterable, Optional

__all__ = ["progress_bar", "is_terminal"]


def is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_bar(iterable: Optional[Iterable] = None, *, desc: str = "", total=None, enabled: Optional[bool] = None, unit="it"):
    """A tqdm bar on stderr when ``enabled`` (default: stderr is a terminal), else a silent one."""
    from tqdm.auto import tqdm

    enabled = is_terminal() if enabled is None else enabled
    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, unit=unit, file=sys.stderr, **scale)
