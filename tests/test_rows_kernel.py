"""The CPU row-segment kernel (liedeploy/core/rows_kernel.c through liedeploy.core.native.rows_linear):
rows of several tasks, each segment through its own Linear weight, in one call.

Contract: every output within the float32 dot-product bound of a float64 reference
(K * 2^-24 * sum |x_k w_k|, plus one rounding of the bias add); a row's bits do not depend on the
other rows, their segments or the thread count; :class:`MixedView` takes it for plain float32
``nn.Linear`` layers at up to ``ROWS_MAX`` rows per segment and calls each task's module otherwise.
"""

import pytest
import torch
from torch import nn

from liedeploy.core import native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler here: MixedView's fallback runs")


def _ref(x, starts, weights, biases):
    out = []
    for s, (W, b) in enumerate(zip(weights, biases)):
        a, e = int(starts[s]), int(starts[s + 1])
        y = x[a:e].double() @ W.double().T
        out.append(y if b is None else y + b.double())
    return torch.cat(out)


def _bound(x, starts, weights, biases):
    out = []
    for s, (W, b) in enumerate(zip(weights, biases)):
        a, e = int(starts[s]), int(starts[s + 1])
        mag = x[a:e].double().abs() @ W.double().abs().T
        extra = 0 if b is None else (mag + b.double().abs()) * 2.0 ** -24
        out.append(W.shape[1] * 2.0 ** -24 * mag + extra + 1e-30)
    return torch.cat(out)


@pytest.mark.parametrize("K,N", [(1, 1), (15, 3), (16, 4), (37, 65), (256, 130), (300, 64)])
def test_segments_match_a_float64_reference(K, N):
    g = torch.Generator().manual_seed(K * 1000 + N)
    counts = [1, 4, 3, 16, 2, 5]
    starts = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int64)
    x = torch.randn(sum(counts), K, generator=g)
    weights = [torch.randn(N, K, generator=g) for _ in counts]
    biases = [None if i % 2 else torch.randn(N, generator=g) for i in range(len(counts))]
    assert native.rows_supported(x, weights, biases)
    got = native.rows_linear(x, starts, weights, biases)
    assert got.shape == (len(x), N) and got.dtype == torch.float32
    err = (got.double() - _ref(x, starts, weights, biases)).abs()
    assert bool((err <= _bound(x, starts, weights, biases)).all()), float(err.max())


def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_threads():
    g = torch.Generator().manual_seed(7)
    K, N = 70, 131
    x = torch.randn(9, K, generator=g)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    together = native.rows_linear(x, torch.tensor([0, 9]), [W], [b])  # blocks of four rows and a tail
    alone = torch.cat([native.rows_linear(x[i:i + 1].contiguous(), torch.tensor([0, 1]), [W], [b]) for i in range(9)])
    split = native.rows_linear(x, torch.tensor([0, 3, 4, 9]), [W, W, W], [b, b, b])
    assert torch.equal(together, alone) and torch.equal(together, split)
    for threads in (1, 2, 3):
        out = torch.empty(9, N)
        native._rows_call(native._state["rows"], x, out, torch.tensor([0, 9]), [W], [b], threads)
        assert torch.equal(out, together), threads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_widened_and_the_result_rounded_once(dtype):
    g = torch.Generator().manual_seed(3)
    K, N = 200, 67
    counts = [2, 1, 5]
    starts = torch.tensor([0, 2, 3, 8], dtype=torch.int64)
    x = torch.randn(8, K, generator=g).to(dtype)
    weights = [(torch.randn(N, K, generator=g) * 0.1).to(dtype) for _ in counts]
    biases = [torch.randn(N, generator=g).to(dtype), None, None]
    got = native.rows_linear(x, starts, weights, biases)
    assert got.dtype == dtype and got.shape == (8, N)
    ref = _ref(x, starts, weights, biases)  # float64 of the same half-precision values
    eps = torch.finfo(dtype).eps
    bound = _bound(x, starts, weights, biases) + eps * ref.abs() + torch.finfo(dtype).tiny
    assert bool(((got.double() - ref).abs() <= bound).all())
    # torch's own linear in that dtype also rounds a float32 sum once: at most one ulp apart
    torch_out = torch.cat([torch.nn.functional.linear(x[a:b], W, bb) for a, b, W, bb in
                           zip(starts[:-1].tolist(), starts[1:].tolist(), weights, biases)])
    assert bool(((got.double() - torch_out.double()).abs() <= 2 * eps * ref.abs() + 1e-3).all())


def test_unsupported_tensors_are_refused():
    x, W = torch.randn(2, 8), torch.randn(4, 8)
    assert native.rows_supported(x, [W], [None])
    assert native.rows_supported(x.to(torch.bfloat16), [W.to(torch.bfloat16)], [None])
    assert native.rows_supported(torch.randn(8, 2).T, [W], [None])  # x is made contiguous
    assert not native.rows_supported(x.double(), [W.double()], [None])
    assert not native.rows_supported(x, [W, W.to(torch.float16)], [None, None])  # weights of two dtypes
    assert not native.rows_supported(x, [torch.randn(8, 4).T], [None])  # a weight not contiguous
    assert not native.rows_supported(x, [W, torch.randn(5, 8)], [None, None])  # shapes disagree
    assert not native.rows_supported(x, [W], [torch.randn(5)])
    assert not native.rows_supported(x[None], [W], [None])
    assert not native.rows_supported(x, [], [])


def _view(n_tasks=3, width=24):
    from liedeploy.bank.replica import build_replica
    from liedeploy.bank.row_dispatch import MixedView

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 5)).eval()
    reps = {f"t{i}": build_replica(base, {"0.weight": torch.randn(width, width), "2.weight": torch.randn(5, width)})
            for i in range(n_tasks)}
    reps[None] = base
    return MixedView(base, reps), reps


@pytest.mark.parametrize("rows_per_task,seq", [(1, 1), (3, 1), (2, 4), (16, 1), (17, 1), (5, 4)])
def test_mixed_view_takes_the_kernel_for_decode_sized_segments(monkeypatch, rows_per_task, seq):
    view, reps = _view()
    calls = []
    real = native.rows_linear
    monkeypatch.setattr(native, "rows_linear", lambda *a: calls.append(len(a[2])) or real(*a))
    tasks = [t for t in ("t0", "t1", None, "t2") for _ in range(rows_per_task)]
    view.set_rows(tasks)
    x = torch.randn(len(tasks), seq, 24)
    with torch.no_grad():
        got = view(x)
        want = torch.cat([reps[t](x[i:i + 1]) for i, t in enumerate(tasks)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    uses_kernel = rows_per_task * seq <= native.ROWS_MAX
    assert calls == ([4, 4] if uses_kernel else []), (rows_per_task, seq)
    view.set_rows(["t1"] * 3)  # one task alone: its own modules (BLAS)
    with torch.no_grad():
        view(torch.randn(3, seq, 24))
    assert len(calls) == (2 if uses_kernel else 0)


def test_mixed_view_falls_back_without_the_kernel(monkeypatch):
    view, reps = _view()
    monkeypatch.setattr(native, "_state", {"fn": None, "all": None, "rows": None, "omp": False, "why": "test"})
    monkeypatch.setattr(native, "rows_linear", lambda *a: pytest.fail("the kernel ran without a build"))
    view.set_rows(["t0", "t1", "t1"])
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(view(x), torch.cat([reps["t0"](x[:1]), reps["t1"](x[1:])]), rtol=0, atol=0)


def test_mixed_view_keeps_autograd_where_gradients_are_recorded(monkeypatch):
    view, reps = _view()
    monkeypatch.setattr(native, "rows_linear", lambda *a: pytest.fail("the kernel ran while autograd records"))
    view.set_rows(["t0", "t1"])
    x = torch.randn(2, 24, requires_grad=True)
    view(x).sum().backward()  # gradients reach the input through each task's own Linear
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_a_bfloat16_mixed_view_takes_the_kernel(monkeypatch):
    view, reps = _view()
    for m in [view.base, *reps.values()]:
        m.to(torch.bfloat16)
    calls = []
    real = native.rows_linear
    monkeypatch.setattr(native, "rows_linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    view.set_rows(["t0", "t1", "t1", None])
    x = torch.randn(4, 24).to(torch.bfloat16)
    with torch.no_grad():
        got = view(x)
        want = torch.cat([reps["t0"](x[:1]), reps["t1"](x[1:3]), reps[None](x[3:])])
    assert calls == [torch.bfloat16, torch.bfloat16] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2 ** -6)  # a bf16 ulp or two


def test_half_precision_takes_the_kernel_up_to_its_own_row_cap(monkeypatch):
    calls = []
    real = native.rows_linear
    monkeypatch.setattr(native, "rows_linear", lambda *a: calls.append(1) or real(*a))
    for rows, expected in ((native.ROWS_MAX_HALF, 2), (native.ROWS_MAX_HALF + 1, 0)):
        view, reps = _view()
        for m in [view.base, *reps.values()]:
            m.to(torch.bfloat16)
        calls.clear()
        view.set_rows(["t0"] * rows + ["t1"] * rows)
        with torch.no_grad():
            view(torch.randn(2 * rows, 24).to(torch.bfloat16))
        assert len(calls) == expected, rows


def test_rows_path_says_which_path_runs_and_why(monkeypatch):
    from liedeploy.bank.row_dispatch import rows_path

    monkeypatch.delenv("LIEDEPLOY_ROWS", raising=False)
    path, why = rows_path("cpu")
    assert path == "row-segment kernel" and "16 rows" in why
    assert rows_path("meta") == ("one call per task", "the kernel is for CPU, the model is on meta")
    monkeypatch.setenv("LIEDEPLOY_ROWS", "blas")
    assert rows_path("cpu") == ("one call per task", "LIEDEPLOY_ROWS=blas")
    monkeypatch.delenv("LIEDEPLOY_ROWS")
    monkeypatch.setattr(native, "_state", {"fn": None, "all": None, "rows": None, "omp": False, "why": "no compiler"})
    assert rows_path("cpu") == ("one call per task", "no compiler")
