"""The fused fold: W * map(sum_i s_i B_i @ A_i), rounded once, one generated kernel per block.

torch.compile (inductor; Triton on CUDA, C++ on CPU) turns a block's product epilogue into one
pass: the map (exp or 1 + x), the multiply by W and the rounding to the output dtype, reading the
product and W once and writing the result once, with no full-size intermediate. The blocked
eager fold of :func:`liedeploy.core.algebra.fold_sum` stays the fallback.

Which path runs is chosen by :func:`fold_path`, once per device kind:

- ``LIEDEPLOY_FOLD=fused`` or ``=blocked`` forces one;
- otherwise (``auto``) the fused path runs on CUDA when inductor can generate Triton kernels
  there, and the blocked path on CPU, where the generated kernel measured no faster than the
  eager ops that already work block by block in cache (benchmarks/bench_merge.py).

The choice is reported by :func:`fold_path` (and by the server's ``stats()`` and ``/metrics``).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["fold_path", "fused_block", "FOLD_PATHS"]

FOLD_PATHS = ("fused", "blocked")


@functools.lru_cache(maxsize=None)
def _compiler_works(device_type: str) -> bool:
    """Whether torch.compile can generate kernels for ``device_type`` here (tried once)."""
    try:
        fn = torch.compile(lambda a, b: (a * torch.exp(b)).to(torch.float16), dynamic=True)
        x = torch.ones(4, 4, device=device_type)
        fn(x, x)
        return True
    except Exception:  # noqa: BLE001 - no compiler, no Triton: the blocked path
        return False


def fold_path(device: torch.device) -> str:
    """``"fused"`` or ``"blocked"`` for folds on ``device`` (see the module docstring)."""
    want = os.environ.get("LIEDEPLOY_FOLD", "auto").strip().lower()
    if want == "blocked":
        return "blocked"
    kind = torch.device(device).type
    if want == "fused":
        return "fused" if _compiler_works(kind) else "blocked"
    if kind == "cuda":
        try:
            import triton  # noqa: F401  (inductor's CUDA backend)
        except ImportError:
            return "blocked"
        return "fused" if _compiler_works(kind) else "blocked"
    return "blocked"


def _block(prod: torch.Tensor, W: torch.Tensor, exact: bool, out_dtype: torch.dtype) -> torch.Tensor:
    factor = torch.exp(prod) if exact else prod + 1.0
    return (W.to(prod.dtype) * factor).to(out_dtype)


@functools.lru_cache(maxsize=None)
def _compiled(exact: bool, out_dtype: torch.dtype):
    return torch.compile(functools.partial(_block, exact=exact, out_dtype=out_dtype), dynamic=True)


def fused_block(prod: torch.Tensor, W: torch.Tensor, exact: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """One generated pass over a block: ``(W * map(prod)).to(out_dtype)``, ``prod`` in the compute dtype."""
    return _compiled(bool(exact), out_dtype)(prod, W)
