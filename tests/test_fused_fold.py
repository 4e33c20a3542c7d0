"""The fused fold (on CPU the compiled C kernel of liedeploy.core.native) against the blocked eager
fold and a float64 reference, on every layer kind, in fp32, fp16 and bf16.

Contract: both round once from the float64-exact value up to the float32 compute (tolerance: one
rounding of the output dtype, i.e. 2 ulp of the output plus 1e-6 relative for the float32 exp);
zeros stay zeros; non-finite results are refused; ``auto`` runs the fused path on CPU where the
kernel builds, and the blocked path where no compiler is found.
"""

import os

import pytest
import torch

from liedeploy.core.algebra import fold_sum
from liedeploy.core.fused import fold_path, fold_path_reason

from .layer_cases import CASES, make_case, randomize_factors



def _factors(model):
    from liedeploy import LieConfig, apply_adapters_
    from liedeploy.core.adapt import iter_adapters

    apply_adapters_(model, LieConfig(r=2, alpha=2, targets=["0.weight"]))
    randomize_factors(model)
    (_, m, attr, lie), = list(iter_adapters(model))
    return m.parametrizations[attr].original.detach(), lie


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("expmap", ["exact", "first_order"])
def test_fused_and_blocked_folds_agree_on_every_layer_kind(dtype, expmap):
    eps = torch.finfo(dtype).eps
    for case in sorted(CASES):
        model, _ = make_case(case)
        W, lie = _factors(model)
        W = W.to(dtype)
        W.view(-1)[::3] = 0  # zeros of the base
        f = [(lie.lie_B, lie.lie_A, lie.scale)]
        blocked = fold_sum(W, f, expmap, path="blocked")
        fused = fold_sum(W, f, expmap, path="fused")
        dW = (lie.lie_B.double() @ lie.lie_A.double()).reshape(W.shape) * lie.scale
        ref = W.double() * (torch.exp(dW) if expmap == "exact" else 1 + dW)
        for got in (blocked, fused):
            assert got.dtype == dtype
            err = (got.double() - ref).abs() - (2 * eps * ref.abs() + 1e-6 * ref.abs())
            assert float(err.max()) <= 0, (case, dtype, expmap)
            assert bool((got.view(-1)[::3] == 0).all()), case  # zeros stay zeros
        assert float((fused.double() - blocked.double()).abs().max()) <= float(2 * eps * ref.abs().max()), case


def test_fused_fold_refuses_non_finite_results_like_the_blocked_one():
    W = torch.full((4, 4), 60000.0, dtype=torch.float16)
    B, A = torch.ones(4, 1), torch.ones(1, 4)
    for path in ("blocked", "fused"):
        ok: list = []
        fold_sum(W, [(B, A, 1.0)], "exact", check=ok, path=path)
        assert ok == [False], path


def test_auto_picks_the_fused_path_on_cpu_and_the_env_forces_blocked(monkeypatch):
    from liedeploy.core import native

    monkeypatch.delenv("LIEDEPLOY_FOLD", raising=False)
    if native._compiler() is None:
        pytest.skip("no C compiler here: the fallback is tested below")
    assert native.status() == "ready"
    assert fold_path(torch.device("cpu")) == "fused"
    monkeypatch.setenv("LIEDEPLOY_FOLD", "blocked")
    assert fold_path(torch.device("cpu")) == "blocked"


def test_without_a_compiler_the_blocked_path_runs_and_says_why(monkeypatch, tmp_path):
    from liedeploy.core import native

    monkeypatch.delenv("LIEDEPLOY_FOLD", raising=False)
    monkeypatch.setenv("LIEDEPLOY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_state", {})
    assert fold_path_reason(torch.device("cpu")) == ("blocked", "no C compiler found ($CC, cc, gcc, clang)")
    W = torch.randn(8, 70)
    B, A = torch.randn(8, 2) * 0.1, torch.randn(2, 70)
    got = fold_sum(W, [(B, A, 1.0)], "exact", path="fused")  # forced: falls back, same numbers
    assert torch.equal(got, fold_sum(W, [(B, A, 1.0)], "exact", path="blocked"))
    assert list(tmp_path.iterdir()) == []


def test_a_broken_compiler_falls_back_naming_it(monkeypatch, tmp_path):
    from liedeploy.core import native

    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'fake-cc: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LIEDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_compiler", lambda: str(fake))
    monkeypatch.setattr(native, "_state", {})
    assert not native.available()
    assert native.status() == f"the C compiler {fake} could not build the fold kernel (fake-cc: cannot compile)"
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left behind


def test_an_unwritable_cache_builds_in_a_private_folder_and_removes_it(monkeypatch, tmp_path):
    from liedeploy.core import native

    if native._compiler() is None:
        pytest.skip("no C compiler here")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LIEDEPLOY_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(native, "_state", {})
    made = []
    real_mkdtemp = native.tempfile.mkdtemp
    monkeypatch.setattr(native.tempfile, "mkdtemp", lambda **k: made.append(real_mkdtemp(**k)) or made[-1])
    assert native.status() == "ready"
    assert len(made) == 1 and not os.path.exists(made[0])  # built there, loaded, removed
    W = torch.randn(8, 64)
    B, A = torch.randn(8, 2) * 0.1, torch.randn(2, 64)
    assert torch.equal(fold_sum(W, [(B, A, 1.0)], "exact", path="fused"),
                       fold_sum(W, [(B, A, 1.0)], "exact", path="fused"))


def test_the_kernel_is_built_once_per_machine_and_reused(monkeypatch, tmp_path):
    from liedeploy.core import native

    monkeypatch.setenv("LIEDEPLOY_CACHE_DIR", str(tmp_path))
    lib, why = native._build()
    assert why is None and os.path.dirname(lib) == str(tmp_path)
    mtime = os.stat(lib).st_mtime_ns
    calls = []
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    assert native._build() == (lib, None)
    assert [a[0][1] for a in calls] == ["--version"]  # no second compile
    assert os.stat(lib).st_mtime_ns == mtime


real_run = __import__("subprocess").run


def _fold1(W, B, A, expmap, **kw):
    return fold_sum(W, [(B, A, 1.0)], expmap, path="fused", **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_precision_value_passes_through_a_zero_update_unchanged(dtype):
    """exp(0) = 1 exactly, so W * 1 rounded to W's dtype is W, bit for bit: the kernel's widening and
    rounding of all 65,536 bit patterns (subnormals, inf, NaN included)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int16)
    W = bits.view(dtype).reshape(256, 256)
    B, A = torch.zeros(256, 4), torch.randn(4, 256)
    for expmap in ("exact", "first_order"):
        got = _fold1(W, B, A, expmap)
        nan = torch.isnan(W)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got.view(torch.int16)[~nan], W.view(torch.int16)[~nan])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_to_half_precision_matches_torch_bit_for_bit(dtype):
    """float32 results of every magnitude (random bit patterns, halfway cases, the overflow edge)
    round to nearest even exactly as torch's cast does."""
    g = torch.Generator().manual_seed(1)
    rnd = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    near = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 1e-10, 3.4e38])
    halfway = (torch.arange(0, 1 << 12, dtype=torch.int32) * (1 << 12) + 0x3F800000 + (1 << 12)).view(torch.float32)
    x = torch.cat([rnd, near, -near, halfway])
    x = torch.cat([x, torch.zeros((-x.numel()) % 128)]).reshape(-1, 128)
    B, A = torch.zeros(x.shape[0], 1), torch.zeros(1, 128)
    got = fold_sum(x, [(B, A, 1.0)], "first_order", out_dtype=dtype, path="fused")
    want = x.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def test_exp_is_within_two_ulp_of_float64_and_overflows_and_underflows_as_ieee():
    x = torch.cat([torch.linspace(-110, 100, 200_000, dtype=torch.float64), torch.tensor([0.0, 88.72, 88.73, -87.3])])
    x = torch.cat([x, torch.zeros((-x.numel()) % 64, dtype=torch.float64)])
    xf = x.float()
    B, A = xf.reshape(-1, 1), torch.ones(1, 1)  # one column: every value goes through the tail tile too
    W = torch.ones(x.numel(), 1)
    got = _fold1(W, B, A, "exact").reshape(-1).double()
    ref = torch.exp(xf.double())
    normal = (ref > torch.finfo(torch.float32).tiny) & (ref < torch.finfo(torch.float32).max)
    rel = ((got - ref).abs() / ref)[normal]
    assert float(rel.max()) <= 2 * torch.finfo(torch.float32).eps
    assert bool(torch.isinf(got[ref > torch.finfo(torch.float32).max]).all())
    sub = ref <= torch.finfo(torch.float32).tiny  # subnormal results: within one subnormal step
    assert float((got[sub] - ref[sub]).abs().max()) <= 2 * 2.0**-149
    rows = xf[::1000].reshape(-1, 1)  # the same values through full tiles: the same bits
    wide = _fold1(torch.ones(rows.shape[0], 256), rows, torch.ones(1, 256), "exact")
    assert torch.equal(wide, got.float()[::1000].reshape(-1, 1).expand_as(wide))


def test_several_adapters_in_place_and_threads_give_the_same_bits():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(300, 200, generator=g)
    f = [(torch.randn(300, 4, generator=g) * 0.1, torch.randn(4, 200, generator=g), 0.5),
         (torch.randn(300, 8, generator=g) * 0.1, torch.randn(8, 200, generator=g), 2.0)]
    one = fold_sum(W, f, "exact", path="fused")
    ref = W.double() * torch.exp(sum(s * B.double() @ A.double() for B, A, s in f))
    tol = (2 * torch.finfo(torch.float32).eps + 1e-6) * ref.abs()  # as above: float32 product and exp
    assert float(((one.double() - ref).abs() - tol).max()) <= 0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fold_sum(W, f, "exact", path="fused")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, single)
    Wc = W.clone()
    fold_sum(Wc, f, "exact", out=Wc, path="fused")
    assert torch.equal(Wc, one)


@pytest.mark.parametrize("where", ["full tile", "tail"])
@pytest.mark.parametrize("what", ["overflow", "nan factor"])
def test_the_fused_check_flags_one_bad_result_anywhere(where, what):
    W = torch.ones(64, 100)  # columns 0-63 a full tile, 64-99 the tail
    B, A = torch.zeros(64, 2), torch.zeros(2, 100)
    col = 10 if where == "full tile" else 97
    A[0, col] = float("nan") if what == "nan factor" else 1.0
    B[33, 0] = 100.0
    ok: list = []
    out = fold_sum(W, [(B, A, 1.0)], "exact", check=ok, path="fused")
    assert ok == [False]
    assert not bool(torch.isfinite(out[33, col]))
    ok2: list = []
    fold_sum(W, [(torch.zeros(64, 2), A.nan_to_num(0.0), 1.0)], "exact", check=ok2, path="fused")
    assert ok2 == [True]


def _ulps(got, ref64):
    """|got - ref| in units of the float32 spacing at ref."""
    r32 = ref64.float()
    step = (torch.nextafter(r32, torch.tensor(float("inf"))).double() - r32.double())
    return (got.double() - ref64).abs() / step


def test_small_updates_take_the_short_exp_within_one_ulp_and_large_ones_do_not():
    """Rows whose |dW| is provably <= 1/8 use a degree-6 Taylor exp: within 1 ulp of float64 there
    (measured 0.56); a group of four rows with one large value keeps the full exp for all four."""
    x = torch.linspace(-0.125, 0.125, 400_000, dtype=torch.float64).float()
    W = torch.ones(x.numel(), 1)
    got = _fold1(W, x.reshape(-1, 1), torch.ones(1, 1), "exact").reshape(-1)
    assert float(_ulps(got, torch.exp(x.double())).max()) <= 1.0
    mixed = torch.tensor([0.01, -0.1, 0.12, 3.0, 0.05, 0.06, 0.07, 0.08])  # rows 0-3 full, rows 4-7 short
    wide = torch.ones(8, 64)  # one full tile per row
    got = _fold1(wide, mixed.reshape(-1, 1), torch.ones(1, 64), "exact")
    assert float(_ulps(got[:, 0], torch.exp(mixed.double())).max()) <= 1.0
    assert torch.equal(got, got[:, :1].expand_as(got))


def test_merge_merge_files_and_the_bank_all_fold_on_the_fused_path(tmp_path, monkeypatch):
    """The compiled kernel is what every entry point runs on CPU (auto), and the fallback gives the
    same weights to one rounding."""
    import copy

    from liedeploy import AdapterBank, load_adapter, merge_, merge_files
    from liedeploy.core import native
    from safetensors.torch import load_file
    from tests.conftest import _write_adapter, save_state_dict
    from tests.models import MixedLayers

    monkeypatch.delenv("LIEDEPLOY_FOLD", raising=False)
    calls = []
    real = native.fold_rows
    monkeypatch.setattr(native, "fold_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    base = MixedLayers()
    base_path = str(tmp_path / "base.safetensors")
    save_state_dict(base, base_path)
    ad = _write_adapter(base, str(tmp_path / "a.safetensors"), ["conv", "fc"], r=3, std=0.1)
    results = {}
    for path in ("fused", "blocked"):
        monkeypatch.setenv("LIEDEPLOY_FOLD", path)
        out = str(tmp_path / f"{path}.safetensors")
        counts = [len(calls)]
        merge_files(base_path, [ad], out)
        counts.append(len(calls))
        live = merge_(load_adapter(copy.deepcopy(base), ad)).state_dict()
        counts.append(len(calls))
        bank = AdapterBank(base, adapters={"a": ad}).model_for("a").state_dict()
        counts.append(len(calls))
        results[path] = (load_file(out), live, bank)
        ran = [b > a for a, b in zip(counts, counts[1:])]  # merge_files, merge_, the bank
        assert ran == [path == "fused"] * 3, (path, ran)
    for got_f, got_b in zip(results["fused"], results["blocked"]):
        for k, v in got_b.items():
            if v.is_floating_point():
                tol = 2 * torch.finfo(v.dtype).eps * float(v.abs().max()) + 1e-7
                assert float((got_f[k].float() - v.float()).abs().max()) <= tol, k


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_ranks_and_dtype_pairs_match_float64_and_the_blocked_path(seed):
    """Rows not a multiple of four, columns with and without a tail, ranks from 1 to 80 (past the
    tail tile's 64: those fall back), several adapters, every pair of input and output dtypes."""
    g = torch.Generator().manual_seed(100 + seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for _ in range(8):
        m = int(torch.randint(1, 70, (1,), generator=g))
        n = int(torch.randint(1, 300, (1,), generator=g))
        w_dt, o_dt = (dtypes[int(i)] for i in torch.randint(0, 3, (2,), generator=g))
        expmap = ("exact", "first_order")[int(torch.randint(0, 2, (1,), generator=g))]
        f = []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            r = int(torch.randint(1, 41, (1,), generator=g))
            spread = float(torch.rand(1, generator=g)) * 0.3  # some cases take the short exp, some not
            f.append((torch.randn(m, r, generator=g) * spread, torch.randn(r, n, generator=g), 1.5))
        W = torch.randn(m, n, generator=g).to(w_dt)
        W.view(-1)[:: 7] = 0
        fused = fold_sum(W, f, expmap, out_dtype=o_dt, path="fused")
        blocked = fold_sum(W, f, expmap, out_dtype=o_dt, path="blocked")
        d = sum(s * B.double() @ A.double() for B, A, s in f)
        ref = W.double() * (torch.exp(d) if expmap == "exact" else 1 + d)
        # float32 computes dW with an absolute error of a few ulp of sum |s B||A| (cancellation in
        # 1 + dW or in the sum is not the kernel's to fix), then the output dtype rounds once
        terms = sum(abs(s) * B.double().abs() @ A.double().abs() for B, A, s in f)
        scale = ref.abs() if expmap == "exact" else W.double().abs()
        tol = 2 * torch.finfo(o_dt).eps * ref.abs() + 8 * torch.finfo(torch.float32).eps * terms * scale
        case = (m, n, [B.shape[1] for B, _, _ in f], w_dt, o_dt, expmap)
        for got in (fused, blocked):
            assert got.dtype == o_dt
            assert float(((got.double() - ref).abs() - tol).max()) <= 0, case
            assert bool((got.view(-1)[:: 7] == 0).all()), case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1024, 1000])
def test_large_out_of_place_folds_stored_around_the_cache_give_the_in_place_bits(dtype, n):
    """An out-of-place fold of at least 1 MiB per thread stores around the cache (non-temporal
    stores where aligned; rows of 1000 columns leave most tiles unaligned, so both kinds of store
    mix): the same bits as the in-place fold, which stores through the cache, on 1 and 2 threads,
    and within the float64 bound."""
    g = torch.Generator().manual_seed(n)
    W = torch.randn(1200, n, generator=g).to(dtype)
    B, A = torch.randn(1200, 16, generator=g) * 0.05, torch.randn(16, n, generator=g) * 0.05
    inplace = W.clone()
    fold_sum(inplace, [(B, A, 1.0)], "exact", out=inplace, path="fused")
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out = torch.full_like(W, float("nan"))
            fold_sum(W, [(B, A, 1.0)], "exact", out=out, path="fused")
            assert torch.equal(out, inplace)
    finally:
        torch.set_num_threads(threads)
    ref = W.double() * torch.exp(B.double() @ A.double())
    # one rounding to dtype (half an eps, or half a subnormal step) after float32 math (2 float32 eps)
    eps, step = torch.finfo(dtype).eps, torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    tol = (eps / 2 + 2 * torch.finfo(torch.float32).eps) * ref.abs() + step / 2
    assert float(((inplace.double() - ref).abs() - tol).max()) <= 0
