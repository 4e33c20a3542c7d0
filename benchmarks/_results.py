"""Writing a benchmark's results: its printed table as ``results/<stem>.txt``, its data as ``.json``."""

from __future__ import annotations

import json
import os

__all__ = ["write_results"]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(stem: str, text: str, data=None) -> None:
    """Print ``text`` and keep it in ``results/<stem>.txt``, with ``data`` in ``results/<stem>.json``."""
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, stem + ".txt"), "w") as f:
        f.write(text + "\n")
    if data is not None:
        with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
            json.dump(data, f, indent=1)
