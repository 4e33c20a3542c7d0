"""Lie-algebra math: the perturbation dW from its factors, the exponential maps, composition.

W' = W * exp(dW) (``exact``) or W * (1 + dW) (``first_order``), dW = scale * reshape(B @ A, W.shape).

:class:`LieFold` is the autograd function used in training: its forward keeps no full-size tensor
alive (only W, which the model holds anyway, and the small factors) and its backward recomputes
exp(dW) instead, so the exact map costs about what the first-order map costs.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

from liedeploy.errors import ConfigError, LieError

__all__ = ["check_finite", "compute_dtype", "fold", "fold_sum", "lie_fold", "LieFold"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fold is computed in: at least float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float,
    expmap: str = "exact",
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """W' = W * map(dW), computed in at least float32, rounded once to ``out_dtype`` (default W's).

    No autograd: for merging. Allocates one full-size tensor in the compute dtype.
    """
    return fold_sum(W, [(B, A, scale)], expmap, out_dtype)


_CHUNK_BYTES = 1 << 22  # rows are folded in blocks of about this size, so each block stays in cache


def fold_sum(
    W: torch.Tensor,
    factors: Iterable[tuple],
    expmap: str = "exact",
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    check: Optional[list] = None,
    path: Optional[str] = None,
    w_absmax: Optional[float] = None,
) -> torch.Tensor:
    """Fold several perturbations at once: W * map(sum_i s_i dW_i).

    For ``exact`` this is the exact group composition exp(dW1) * exp(dW2) = exp(dW1 + dW2).
    ``factors`` is an iterable of ``(B, A, scale)``. Computed in at least float32, block by block
    (each block of rows stays in cache: one read of W, one write of the result), and rounded once
    to ``out_dtype`` (default: W's dtype). ``out`` may be given to write into existing storage,
    including W's own (an in-place fold).
    With ``check=[]``, ``True`` is appended if every result is finite (tested block by block
    while the block is in cache: a sum is non-finite iff some element is, up to overflow of the
    sum itself, which is then settled by an exact test), else ``False``. With ``w_absmax`` (max|W|,
    known to the caller, e.g. a bank that folds the same base again and again), the check is first
    settled from the factors alone: ``|dW| <= max_i sum_k |s B_ik| max_j |A_kj|`` bounds every
    result by ``w_absmax * exp(bound)`` (or ``* (1 + bound)``), and a bound well inside the output
    dtype's range proves every result finite without reading it again; otherwise the scan runs.

    Where :func:`liedeploy.core.fused.fold_path` says ``"fused"`` (``path`` forces one), a CPU fold
    runs the compiled kernel of :mod:`liedeploy.core.native` (the product, the map, the multiply by W,
    the rounding and the finiteness flag in one pass; every factor pair side by side along the rank)
    and a CUDA fold computes each block's product with ``mm`` and the rest as one generated kernel;
    otherwise (``"blocked"``, or tensors the kernel does not take) the product, the map and the
    multiply run as eager in-place ops block by block. Both round once.
    """
    from liedeploy.core.fused import fold_path

    if expmap not in ("exact", "first_order"):
        raise ConfigError(f"expmap must be 'exact' or 'first_order', got {expmap!r}")
    cdt = compute_dtype(W.dtype)
    out_dtype = out.dtype if out is not None else (out_dtype or W.dtype)
    m = W.shape[0]
    with torch.no_grad():
        pairs = []
        for B, A, scale in factors:
            B2 = B.to(device=W.device, dtype=cdt)
            if scale != 1.0:
                B2 = B2 * scale
            pairs.append((B2, A.to(device=W.device, dtype=cdt)))
        in_place = out is not None and out.data_ptr() == W.data_ptr()
        if out is None:
            out = torch.empty(W.shape, dtype=out_dtype, device=W.device)
        if not pairs:
            out.copy_(W)
            if check is not None:
                check.append(bool(torch.isfinite(out).all()))
            return out
        W2 = W.reshape(m, -1)
        O2 = out.view(m, -1)
        n = W2.shape[1]
        rows = max(1, _CHUNK_BYTES // max(1, n * 4))
        fused = (path or fold_path(W.device)) == "fused"
        if fused and W.device.type == "cpu" and cdt == torch.float32:
            if _fold_native(W2, O2, pairs, expmap, check):  # its check is free: no bound needed
                return out
        if check is not None and w_absmax is not None and _bounded(pairs, w_absmax, expmap, (cdt, out_dtype)):
            check.append(True)  # proven finite from the factors: no scan of the result
            check = None
        if fused and W.device.type != "cpu":
            return _fold_fused(W2, O2, out, pairs, expmap, rows, cdt, check)
        return _fold_blocked(W2, O2, out, pairs, expmap, rows, cdt, in_place, check)


def _fold_blocked(W2, O2, out, pairs, expmap: str, rows: int, cdt, in_place: bool, check) -> torch.Tensor:
    """The blocked path of :func:`fold_sum`: per block of rows, ``mm``, then the map and the multiply
    by W as eager in-place ops, written straight into ``out`` unless a cast is needed or ``out`` is
    W itself (in place)."""
    m, n = W2.shape
    direct = O2.dtype == cdt and not in_place
    buf = None if direct else torch.empty((min(rows, m), n), dtype=cdt, device=W2.device)
    wbuf = torch.empty((min(rows, m), n), dtype=cdt, device=W2.device) if W2.dtype != cdt else None
    total = None
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        blk = O2[r0:r1] if direct else buf[: r1 - r0]
        B0, A0 = pairs[0]
        torch.mm(B0[r0:r1], A0, out=blk)
        for Bi, Ai in pairs[1:]:
            blk.addmm_(Bi[r0:r1], Ai)
        if expmap == "exact":
            blk.exp_()
        else:
            blk.add_(1.0)
        Wb = W2[r0:r1]
        if in_place and Wb.dtype == cdt:
            Wb.mul_(blk)  # W <- W * map(dW) in W's own storage: no copy back
        else:
            if Wb.dtype != cdt:  # a half-precision base: widen the block first (mixed-dtype mul is slow)
                Wb = wbuf[: r1 - r0].copy_(Wb)
            blk.mul_(Wb)
            if not direct:
                O2[r0:r1].copy_(blk)
        if check is not None:
            total = _add_block_sum(total, O2[r0:r1], cdt)
    _settle_check(check, total, out)
    return out


def _add_block_sum(total, block, cdt):
    """The running sum of the rounded results (fp16 overflows show here), for the finiteness check."""
    bs = block.sum(dtype=cdt)
    return bs if total is None else total.add_(bs)


def _settle_check(check, total, out) -> None:
    """Append to ``check`` whether every result is finite: the running sum is finite iff every value
    is, unless the sum itself overflowed, which an exact test then decides."""
    if check is None:
        return
    ok = total is None or bool(torch.isfinite(total))
    if not ok:
        ok = bool(torch.isfinite(out).all())
    check.append(ok)


def _bounded(pairs, w_absmax: float, expmap: str, dtypes) -> bool:
    """Whether every ``W * map(sum_i B_i @ A_i)`` is finite given ``max|W| = w_absmax``, from the
    factors alone: ``|sum_i (B_i @ A_i)_jk| <= max_j sum_i sum_l |B_i[j, l]| max_k |A_i[l, k]|``.
    NaN or inf anywhere makes the bound non-finite, so the caller scans."""
    bound = 0.0
    for B, A in pairs:
        if B.numel() and A.numel():  # nonnegative terms: float32 rounding stays within r * eps, far below the margin
            bound += float(torch.mv(B.abs(), A.abs().amax(dim=1)).max())
    if not (math.isfinite(bound) and math.isfinite(w_absmax)):
        return False
    bound = bound * (1 + 1e-3) + 1e-6  # rounding of the products and of the map
    if expmap == "exact":
        if bound > 700:
            return False
        top = w_absmax * math.exp(bound)
    else:
        top = w_absmax * (1.0 + bound)
    return all(top * (1 + 1e-3) < torch.finfo(dt).max / 2 for dt in dtypes)


def _fold_native(W2, O2, pairs, expmap: str, check) -> bool:
    """The fused path on CPU (:mod:`liedeploy.core.native`): every adapter's factors side by side,
    one pass of the compiled kernel. False (nothing written) where the kernel does not run here or
    does not take these tensors; the caller then folds the blocked way."""
    from liedeploy.core import native

    B = pairs[0][0] if len(pairs) == 1 else torch.cat([Bi for Bi, _ in pairs], dim=1)
    A = pairs[0][1] if len(pairs) == 1 else torch.cat([Ai for _, Ai in pairs], dim=0)
    if not (native.available() and native.supports(W2, O2, B.shape[1], W2.shape[1])):
        return False
    if A.data_ptr() % 64 or not A.is_contiguous():  # a view into a file's buffer: vector loads of A
        A = A.clone(memory_format=torch.contiguous_format)  # would straddle cache lines (A is small: R x n)
    finite = native.fold_rows(W2, O2, B, A, expmap == "exact")
    if check is not None:
        check.append(finite)
    return True


def _fold_fused(W2, O2, out, pairs, expmap: str, rows: int, cdt, check) -> torch.Tensor:
    """The fused path of :func:`fold_sum`: per block, ``mm`` then one generated kernel."""
    from liedeploy.core.fused import fused_block

    m, n = W2.shape
    prod = torch.empty((min(rows, m), n), dtype=cdt, device=W2.device)
    total = None
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        p = prod[: r1 - r0]
        B0, A0 = pairs[0]
        torch.mm(B0[r0:r1], A0, out=p)
        for Bi, Ai in pairs[1:]:
            p.addmm_(Bi[r0:r1], Ai)
        O2[r0:r1].copy_(fused_block(p, W2[r0:r1], expmap == "exact", O2.dtype))
        if check is not None:
            total = _add_block_sum(total, O2[r0:r1], cdt)
    _settle_check(check, total, out)
    return out


class LieFold(torch.autograd.Function):
    """W' = W * map(scale * reshape(B @ A)) with a backward that recomputes map(dW) block by block.

    Saved for backward: W, B, A (no full-size intermediate). Gradients, with g = dL/dW'
    matricized (m, n):
        exact:       G = dL/d(dW) = g * W * exp(dW)
        first_order: G = dL/d(dW) = g * W
        dL/dB = scale * G @ A^T,  dL/dA = scale * B^T @ G,  dL/dW = g * map(dW) (if W needs grad)
    Forward and backward walk W in blocks of rows that stay in cache, so neither allocates a
    full-size temporary beyond the output (forward) and dL/dW (backward, only if W needs grad).
    """

    @staticmethod
    def forward(ctx, W, B, A, scale: float, expmap: str):  # type: ignore[override]
        with torch.autocast(W.device.type, enabled=False):
            out = fold_sum(W, [(B, A, scale)], expmap, path="blocked")  # training: eager ops only
        ctx.save_for_backward(W, B, A)
        ctx.scale = scale
        ctx.expmap = expmap
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        W, B, A = ctx.saved_tensors
        scale, expmap = ctx.scale, ctx.expmap
        cdt = compute_dtype(W.dtype)
        m = W.shape[0]
        g2 = grad_out.reshape(m, -1)
        W2 = W.reshape(m, -1)
        n = W2.shape[1]
        need_W, need_B, need_A = ctx.needs_input_grad[:3]
        with torch.autocast(W.device.type, enabled=False):
            Bs = B.to(cdt) * scale
            A2 = A.to(cdt)
            gB = torch.empty((m, B.shape[1]), dtype=cdt, device=W.device) if need_B else None
            gA = torch.zeros((A.shape[0], n), dtype=cdt, device=W.device) if need_A else None
            gW = torch.empty_like(W2) if need_W else None
            rows = max(1, _CHUNK_BYTES // max(1, n * 4))
            buf = torch.empty((min(rows, m), n), dtype=cdt, device=W.device)
            for r0 in range(0, m, rows):
                r1 = min(m, r0 + rows)
                g = g2[r0:r1] if g2.dtype == cdt else g2[r0:r1].to(cdt)
                t = buf[: r1 - r0]
                if expmap == "exact" or need_W:
                    torch.mm(Bs[r0:r1], A2, out=t)
                    if expmap == "exact":
                        t.exp_()
                    else:
                        t.add_(1.0)
                    if need_W:
                        gW[r0:r1] = g * t
                    if expmap == "exact":
                        t.mul_(W2[r0:r1]).mul_(g)
                    else:
                        torch.mul(g, W2[r0:r1], out=t)
                else:
                    torch.mul(g, W2[r0:r1], out=t)
                if need_B:
                    torch.mm(t, A2.t(), out=gB[r0:r1])
                if need_A:
                    gA.addmm_(Bs[r0:r1].t(), t)
            if need_B:
                gB = gB.mul_(scale).to(B.dtype)
            if need_A:
                gA = gA.to(A.dtype)
            if need_W:
                gW = gW.reshape(W.shape)
        return gW, gB, gA, None, None


def lie_fold(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, expmap: str = "exact") -> torch.Tensor:
    """Differentiable W * map(scale * reshape(B @ A, W.shape)) (see :class:`LieFold`)."""
    if expmap not in ("exact", "first_order"):
        raise ConfigError(f"expmap must be 'exact' or 'first_order', got {expmap!r}")
    return LieFold.apply(W, B, A, float(scale), expmap)


def check_finite(name: str, merged: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float, ok=None,
                 W: Optional[torch.Tensor] = None) -> None:
    """Refuse a merged tensor with inf/NaN, naming the tensor and the cause.

    A base tensor ``W`` that already holds NaN/inf is blamed on the base; otherwise the message
    gives the largest |dW| (the Lie-algebra perturbation) and the factor exp(|dW|) it scales by.
    ``ok``: the result of ``fold_sum(..., check=...)`` when already known.
    """
    if ok if ok is not None else bool(torch.isfinite(merged).all()):
        return
    if W is not None and not bool(torch.isfinite(W).all()):
        raise LieError(f"base tensor {name} already holds NaN or inf values: the base is broken, not the adapter")
    with torch.no_grad():
        d = torch.mm(B.float() * scale, A.float()).abs().max().item()
    factor = f"e^{d:.4g}" if d > 700 else f"{math.exp(d):.4g}"
    raise LieError(
        f"merging {name} overflows {merged.dtype}: the largest |dW| is {d:.4g}, so exp(dW) scales a weight by up to "
        f"{factor}; the adapter is unusable with this base dtype"
    )
