"""Model outputs as flat lists of tensors, one copy for the exporters, the serving backends and the
bank: a tensor, a tuple/list, a dict or a transformers ModelOutput (``None`` entries skipped).
"""

from __future__ import annotations

from typing import Any

__all__ = ["flatten_named", "flatten_outputs"]


def flatten_named(out: Any, prefix: str = "") -> list:
    """``[(name, tensor)]`` of a model output with stable names.

    A tensor is ``output``; a tuple or list gives ``output_0``, ``output_1``...; a dict or a
    transformers ModelOutput gives its keys (nested: ``hidden_states.0``). ``None`` entries are skipped.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        out = {k: out[k] for k in out.keys()}
    if isinstance(out, dict):
        items = []
        for k, v in out.items():
            items += flatten_named(v, f"{prefix}.{k}" if prefix else str(k))
        return items
    if isinstance(out, (list, tuple)):
        items = []
        for i, v in enumerate(out):
            items += flatten_named(v, f"{prefix}.{i}" if prefix else f"output_{i}")
        return items
    return []


def flatten_outputs(out: Any) -> list:
    """The tensors of a model output in order (the values of :func:`flatten_named`)."""
    return [t for _, t in flatten_named(out)]
