"""Sparsity of weight tensors, with numpy only: magnitude masks, N:M masks and conformance checks.

N:M runs along the reduction axis in the layout sparse tensor cores use: for a 2-D weight
``(out, in)`` (``nn.Linear``), groups of M consecutive inputs of a row; for a convolution
``(out, in, *k)``, groups of M consecutive input channels at each kernel position (the KRSC
layout cuSPARSELt and TensorRT prune). A transformers ``Conv1D`` stores ``(in, out)``: prune its
transpose (not detected from a file).
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_float", "magnitude_mask", "nm_mask", "nm_conforms", "zero_mask", "nm_applicable"]


def as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of a tensor read raw (``BF16`` arrives as uint16 bits)."""
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def zero_mask(a: np.ndarray, dtype: str) -> np.ndarray:
    """True where the stored value is zero (+0 or -0)."""
    if dtype == "BF16":
        return (a & 0x7FFF) == 0
    return a == 0


def magnitude_mask(values: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask that zeroes the ``floor(sparsity * numel)`` smallest magnitudes (ties: lowest index first)."""
    flat = np.abs(values.reshape(-1))
    k = int(np.floor(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if k > 0:
        keep[np.argsort(flat, kind="stable")[:k]] = False
    return keep.reshape(values.shape)


def _groups_view(values: np.ndarray, m: int) -> np.ndarray:
    """``values`` as (..., M) groups along the reduction axis (see the module docs)."""
    if values.ndim == 2:
        return values.reshape(values.shape[0], -1, m)
    moved = np.moveaxis(values, 1, -1)  # (out, *k, in)
    return moved.reshape(-1, m)


def nm_applicable(shape, m: int) -> bool:
    """Whether a weight of ``shape`` has a reduction axis divisible into groups of M."""
    return len(shape) >= 2 and shape[1] % m == 0


def nm_mask(values: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask with at most ``m - n`` kept... i.e. ``n`` zeros in every group of ``m`` (the smallest |w|)."""
    g = _groups_view(np.abs(values), m)
    order = np.argsort(g, axis=-1, kind="stable")
    keep = np.ones_like(g, dtype=bool)
    np.put_along_axis(keep, order[..., :n], False, axis=-1)
    if values.ndim == 2:
        return keep.reshape(values.shape)
    moved_shape = np.moveaxis(np.empty(values.shape, dtype=np.uint8), 1, -1).shape
    return np.moveaxis(keep.reshape(moved_shape), -1, 1)


def nm_conforms(zeros: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of ``m`` along the reduction axis holds at least ``n`` zeros."""
    if not nm_applicable(zeros.shape, m):
        return False
    return bool(np.all(_groups_view(zeros, m).sum(-1) >= n))
