"""The CPU kernels, compiled once per machine with its C compiler and loaded with ctypes: the fused
fold (``fold_kernel.c``) and row segments through their own Linear weights (``rows_kernel.c``, for
decode steps of several tasks at once: :func:`rows_linear`).

The kernel folds a range of rows in one pass (the rank-R product in registers, the map, the multiply
by W, the rounding, a non-finite flag: see the C file). The rows are split between
``torch.get_num_threads()`` threads: where torch runs on the GNU OpenMP runtime (Linux wheels), the
library is built with ``-fopenmp`` against that same runtime and the fold runs on torch's own thread
team, whose threads are awake right after torch's ops (a second team, or Python threads, would
compete with them for the cores: a fold right after a parallel torch op took twice as long so).
Elsewhere ctypes releases the GIL for the call and Python threads split the rows.

The shared library is built at the first fold (about a second) into a cache folder,
``$LIEDEPLOY_CACHE_DIR``, else ``$XDG_CACHE_HOME/liedeploy``, else ``~/.cache/liedeploy``, under a
name that hashes the source, the compiler's version, the flags and the CPU, written to a temporary
name and renamed (two processes building at once both succeed). Where that folder cannot be
written, the library is built in a private temporary folder for this process alone and removed once
loaded. The compiler is ``$CC``, else ``cc``, ``gcc`` or ``clang``. Before first use the library is
checked against torch's own ops on a small case, on a short-lived thread of its own; where no
compiler is found, the build fails or the check disagrees, :func:`status` says why and the blocked
eager fold runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

__all__ = ["available", "fold_blocked", "fold_rows", "openmp", "rows_linear", "rows_max", "rows_supported", "status", "supports"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRCS = (os.path.join(_HERE, "fold_kernel.c"), os.path.join(_HERE, "rows_kernel.c"))  # compiled
_HEADERS = (os.path.join(_HERE, "kernel_vec.h"),)  # included by both (hashed with them)
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MAX_TAIL_RANK = 64  # the kernel's padded tail tile holds at most this many rows of A
_MIN_SPLIT = 1 << 16  # below this many elements a fold runs on the calling thread alone
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu11", "-fno-math-errno"]
_ARGS = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_int64, ctypes.c_int64]
_BLOCKED_ARGS = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                 ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
BLOCKS = (16, 32, 48, 64)  # output-channel blocks lie_fold_blocked takes
_ROWS_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]

_lock = threading.Lock()
_state: dict = {}  # "fn"/"all"/"rows": the ctypes functions or None, "why": the reason, "omp": threads in C
_pool: dict = {}  # "pool", "size": the thread pool that splits rows


def _cache_dir() -> str:
    d = os.environ.get("LIEDEPLOY_CACHE_DIR")
    if not d:
        d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                         "liedeploy")
    return d


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _gomp_runtimes() -> set:
    """Paths of the GNU OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return {line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return set()


def _build() -> tuple:
    """(path of the shared library, None) or (None, why not). An OpenMP build where torch runs on
    exactly one GNU OpenMP runtime (the build links the same soname, so the loader reuses it)."""
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    try:
        src = b""
        for path in _SRCS + _HEADERS:
            with open(path, "rb") as f:
                src += f.read() + b"\0"
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C compiler {cc} could not be run ({e})"
    omp = [["-fopenmp"], []] if len(_gomp_runtimes()) == 1 else [[]]
    for flags in ([*_FLAGS, *o, *arch] for o in omp for arch in (["-march=native"], ["-mcpu=native"], [])):
        key = hashlib.sha256(b"\0".join([src, version, " ".join(flags).encode(), platform.machine().encode(),
                                         _cpu_id().encode()])).hexdigest()[:20]
        folder = _cache_dir()
        lib = os.path.join(folder, f"kernels-{key}.so")
        if os.path.isfile(lib):
            return lib, None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=folder)
            os.close(fd)
        except OSError:  # no writable cache: a private folder of this process, removed once loaded
            folder = _state["private"] = tempfile.mkdtemp(prefix="liedeploy-fold-")
            lib = os.path.join(folder, f"kernels-{key}.so")
            fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=folder)
            os.close(fd)
        try:
            r = subprocess.run([cc, *flags, "-o", tmp, *_SRCS], capture_output=True, timeout=120)
            if r.returncode == 0:
                os.replace(tmp, lib)
                return lib, None
            why = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        except (OSError, subprocess.SubprocessError) as e:
            why = [str(e)]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, f"the C compiler {cc} could not build the fold kernel ({why[0]})"


def _self_test(fn, fn_all, rows, blocked) -> Optional[str]:
    """None if the library agrees with torch's ops on small cases (the fold in every dtype, the fold
    into blocked layouts, the row segments with and without bias), else why not."""
    g = torch.Generator().manual_seed(0)
    m, n, R = 5, 150, 3  # 150 = two full tiles and a tail
    B = torch.randn(m, R, generator=g) * 0.3
    A = torch.randn(R, n, generator=g)
    for dt in _DTYPES:
        W = (torch.randn(m, n, generator=g) * 2).to(dt)
        for exact in (True, False):
            p = B @ A
            ref = (W.float() * (torch.exp(p) if exact else p + 1)).to(dt)
            out = torch.empty_like(W)
            tol = 4 * torch.finfo(dt).eps
            for bad in (_call(fn, W, out, B, A, exact, 0, m), fn_all(*_args(W, out, B, A), m, int(exact), 1)):
                if bad != 0 or not torch.allclose(out.float(), ref.float(), rtol=tol, atol=1e-6):
                    return f"the built fold kernel disagrees with torch on {dt} (check {bad})"
    for blk in BLOCKS:  # 40 output channels (padded to whole blocks) x (5 x 3 x 2) columns, rank 3
        Wd = torch.randn(40, 5, 3, 2, generator=g)
        Bd, Ad = torch.randn(40, 3, generator=g) * 0.3, torch.randn(3, 30, generator=g)
        ref = blocked_layout(Wd * torch.exp(Bd @ Ad).view_as(Wd), blk)
        out = torch.full_like(ref, float("nan"))
        bad = _blocked_call(blocked, [(blocked_layout(Wd, blk), out, Bd, Ad, tuple(Wd.shape), blk)], True, 1)
        if bad != [False] or not torch.allclose(out, ref, rtol=4e-7, atol=1e-6):
            return f"the built blocked fold kernel disagrees with torch on blocks of {blk} (check {bad})"
    x = torch.randn(7, 37, generator=g)
    bias = torch.randn(70, generator=g)
    starts = torch.tensor([0, 1, 5, 7], dtype=torch.int64)
    for dt in _DTYPES:
        Ws = [torch.randn(70, 37, generator=g).to(dt) for _ in range(3)]
        out = torch.full((7, 70), float("nan"))
        _rows_call(rows, x, out, starts, Ws, [None, bias, None], 1)
        ref = torch.cat([torch.nn.functional.linear(x[a:b], W.float(), bb) for a, b, W, bb in
                         zip(starts[:-1].tolist(), starts[1:].tolist(), Ws, [None, bias, None])])
        if not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
            return f"the built row-segment kernel disagrees with torch's linear on {dt} weights"
    return None


def _load() -> None:
    lib, why = _build()
    fn = fn_all = rows = blocked = None
    omp = False
    if lib is not None:
        before = _gomp_runtimes()
        try:
            dll = ctypes.CDLL(lib)
            fn, fn_all, rows = dll.lie_fold_rows, dll.lie_fold_all, dll.lie_rows_linear
            blocked = dll.lie_fold_blocked
            fn.restype = fn_all.restype = blocked.restype = ctypes.c_int
            blocked.argtypes = _BLOCKED_ARGS
            rows.restype = None
            fn.argtypes = _ARGS + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
            fn_all.argtypes = _ARGS + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
            rows.argtypes = _ROWS_ARGS
            # OpenMP threads only when loading the library brought no second runtime in
            omp = bool(dll.lie_fold_openmp()) and _gomp_runtimes() == before
            why = _self_test(fn, fn_all, rows, blocked)
        except (OSError, AttributeError) as e:
            why = f"the fold kernel {lib} could not be loaded ({e})"
        if why is not None:
            fn = fn_all = rows = blocked = None
    private = _state.pop("private", None)
    if private:  # the loaded library stays mapped
        shutil.rmtree(private, ignore_errors=True)
    _state.update(fn=fn, all=fn_all, rows=rows, blocked=blocked, omp=omp, why=why)


def _load_guarded() -> None:
    try:
        _load()
    except Exception as e:  # noqa: BLE001 - any failure means the blocked path, with the reason
        _state.update(fn=None, all=None, rows=None, blocked=None, omp=False, why=f"the fold kernel could not be set up ({e})")


def _kernel():
    if "fn" not in _state:
        with _lock:
            if "fn" not in _state:
                # built and checked on a thread of its own that then ends: the check's torch ops on
                # the caller's thread (a server's event loop) left that server with 0.75 of its
                # cores busy instead of 0.92 and 12% fewer requests/s, measured; on a short-lived
                # thread they leave nothing behind
                t = threading.Thread(target=_load_guarded, name="liedeploy-fold-build", daemon=True)
                t.start()
                t.join()
    return _state["fn"]


def available() -> bool:
    """Whether the CPU fused fold can run here (builds and checks it at the first call)."""
    return _kernel() is not None


def openmp() -> bool:
    """Whether folds split their rows over torch's own OpenMP threads (else over Python threads)."""
    return available() and bool(_state["omp"])


def status() -> str:
    """``"ready"``, or one sentence saying why the CPU fused fold does not run here."""
    return "ready" if available() else _state["why"]


def supports(W: torch.Tensor, out: torch.Tensor, rank: int, n: int) -> bool:
    """Whether :func:`fold_rows` takes these tensors (contiguous, on the CPU, float32/16/bf16)."""
    return (W.device.type == "cpu" and out.device.type == "cpu" and W.dtype in _DTYPES and out.dtype in _DTYPES
            and W.is_contiguous() and out.is_contiguous() and (n % 64 == 0 or rank <= _MAX_TAIL_RANK))


def _args(W, out, B, A) -> tuple:
    return (W.data_ptr(), _DTYPES[W.dtype], out.data_ptr(), _DTYPES[out.dtype], B.data_ptr(), A.data_ptr(),
            A.shape[1], A.shape[0])


def _call(fn, W, out, B, A, exact: bool, r0: int, r1: int) -> int:
    return fn(*_args(W, out, B, A), r0, r1, 1 if exact else 0)


def _threads(size: int) -> ThreadPoolExecutor:
    with _lock:
        if _pool.get("size") != size:
            old = _pool.get("pool")
            _pool.update(pool=ThreadPoolExecutor(size, thread_name_prefix="liedeploy-fold"), size=size)
            if old is not None:
                old.shutdown(wait=False)
        return _pool["pool"]


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    _pool.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def fold_rows(W2: torch.Tensor, O2: torch.Tensor, B: torch.Tensor, A: torch.Tensor, exact: bool) -> bool:
    """``O2 = round(W2 * map(B @ A))`` for 2-D row-major ``W2``/``O2`` (``O2`` may be ``W2``), ``B`` (m x R)
    and ``A`` (R x n) contiguous float32. Returns whether every result is finite."""
    fn = _kernel()
    m, n = W2.shape
    B = B.contiguous()
    A = A.contiguous()
    threads = max(1, min(torch.get_num_threads(), m))
    if threads == 1 or m * n < _MIN_SPLIT:
        bad = _call(fn, W2, O2, B, A, exact, 0, m)
    elif _state["omp"]:  # on torch's own OpenMP team
        bad = _state["all"](*_args(W2, O2, B, A), m, 1 if exact else 0, threads)
    else:
        step = -(-m // threads)
        jobs = [_threads(threads - 1).submit(_call, fn, W2, O2, B, A, exact, r0, min(m, r0 + step))
                for r0 in range(step, m, step)]
        bad = _call(fn, W2, O2, B, A, exact, 0, step)  # the first range on this thread
        bad = max([bad] + [j.result() for j in jobs])
    if bad < 0:
        raise RuntimeError("fold kernel: rank too large for the tail tile")  # supports() rules this out
    return bad == 0


# -- row segments through their own Linear weights (decode steps of several tasks) --------------------
# rows per segment up to which rows_linear beats one BLAS call per segment (bench_rows.py, 2+ tasks:
# float32 1.2-1.9x at 8-16 rows; bfloat16 1.0-1.1x at 8 rows, 0.6-0.8x at 12-16, BLAS using the
# CPU's bf16 dot products there)
ROWS_MAX = 16
ROWS_MAX_HALF = 8


def rows_max(dtype: torch.dtype) -> int:
    """The most rows per segment for which :func:`rows_linear` is worth taking with weights of ``dtype``."""
    return ROWS_MAX if dtype == torch.float32 else ROWS_MAX_HALF


def rows_supported(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether :func:`rows_linear` takes these tensors (2-D ``x`` and weights of one dtype among
    float32, float16 and bfloat16, contiguous weights, all on the CPU, shapes that agree) and the
    kernel runs here."""
    if x.dtype not in _DTYPES or x.device.type != "cpu" or x.dim() != 2 or not weights:
        return False
    n_out, dt = weights[0].shape[0], weights[0].dtype
    for W, b in zip(weights, biases):
        if (W.dtype != dt or dt not in _DTYPES or W.device.type != "cpu" or not W.is_contiguous() or W.dim() != 2
                or W.shape != (n_out, x.shape[1])):
            return False
        if b is not None and (b.dtype not in _DTYPES or b.device.type != "cpu" or b.shape != (n_out,)):
            return False
    return available()


def _rows_call(rows, x, out, starts, weights, biases, threads) -> None:
    n = len(weights)
    wp = (ctypes.c_void_p * n)(*[W.data_ptr() for W in weights])
    bp = (ctypes.c_void_p * n)(*[None if b is None else b.data_ptr() for b in biases])
    rows(x.data_ptr(), out.data_ptr(), x.shape[1], out.shape[1], n, starts.data_ptr(), wp, bp,
         _DTYPES[weights[0].dtype], threads)


def rows_linear(x: torch.Tensor, starts: torch.Tensor, weights: Sequence[torch.Tensor],
                biases: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``out[a:b] = x[a:b] @ weights[s].T + biases[s]`` for each segment ``s`` = rows
    ``[starts[s], starts[s + 1])`` of the 2-D ``x``; ``starts`` an int64 tensor of
    ``len(weights) + 1`` offsets from 0 to ``len(x)``. The weights are read in their own dtype
    (float32, float16 or bfloat16) and widened as loaded; sums are float32 and the result is
    rounded once to ``x``'s dtype, as torch's CPU linear does for half-precision inputs. Each row's
    result is independent of the other rows and of the thread count. Check :func:`rows_supported` first."""
    if _kernel() is None:
        raise RuntimeError(f"the row-segment kernel does not run here: {status()}")
    x32 = x.to(torch.float32).contiguous()
    b32 = [None if b is None else b.to(torch.float32).contiguous() for b in biases]
    out = torch.empty((x.shape[0], weights[0].shape[0]), dtype=torch.float32)
    threads = torch.get_num_threads() if _state.get("omp") else 1
    _rows_call(_state["rows"], x32, out, starts, weights, b32, threads)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


# -- folds straight into oneDNN's blocked convolution layouts (liedeploy.core.conv_pack) ------------
def blocked_layout(W: torch.Tensor, blk: int) -> torch.Tensor:
    """The OIHW weight ``W`` laid out as oneDNN's ``Acdb{blk}a``, which ``lie_fold_blocked`` reads and
    writes: output channels zero-padded to whole blocks of ``blk``, then ``(blocks, kh, kw, in, blk)``,
    flattened. A reference for tests and the self-check."""
    o, i, h, w = W.shape
    nb = -(-o // blk)
    pad = torch.zeros(nb * blk, i, h, w, dtype=W.dtype)
    pad[:o] = W
    return pad.view(nb, blk, i, h, w).permute(0, 3, 4, 2, 1).contiguous().view(-1)


def _ptr(t) -> int:
    return t if isinstance(t, int) else t.data_ptr()


def _blocked_call(blocked, layers: Sequence[tuple], exact: bool, threads: int) -> list:
    """``layers``: ``(w, out, B, A, (O, I, KH, KW), blk)`` with ``w``/``out`` tensors or addresses and
    float32 contiguous ``B`` (O x R, scaled) and ``A`` (R x I KH KW). Returns a non-finite flag per layer."""
    n = len(layers)
    dims = (ctypes.c_int64 * (6 * n))()
    ws, outs, bs, as_ = ((ctypes.c_void_p * n)() for _ in range(4))
    for j, (w, out, B, A, shape, blk) in enumerate(layers):
        dims[6 * j: 6 * j + 6] = [*shape, B.shape[1], blk]
        ws[j], outs[j], bs[j], as_[j] = _ptr(w), _ptr(out), B.data_ptr(), A.data_ptr()
    bad = (ctypes.c_int * n)()
    res = blocked(n, dims, ws, outs, bs, as_, 0, 0, 1 if exact else 0, threads, bad)
    if res == -1:
        raise RuntimeError(f"the blocked fold kernel takes blocks of {BLOCKS} only")
    if res != 0:
        raise MemoryError("the blocked fold kernel could not allocate its scratch")
    return [bool(v) for v in bad]


def fold_blocked(layers: Sequence[tuple], exact: bool) -> list:
    """Fold float32 Conv2d weights held in oneDNN's ``Acdb{blk}a`` layout (see :func:`blocked_layout`),
    every layer of a task in one call: each of ``layers`` is ``(w_ptr, out_ptr, B, A, (O, I, KH, KW), blk)``
    with ``out = W * map(B @ A)`` written at ``out_ptr`` (may be ``w_ptr``) in the same layout, ``B``
    (O x R, already scaled) and ``A`` (R x I KH KW, the dense column order) float32. The caller keeps
    the buffers alive and sized for the layout. Returns, per layer, whether every result is finite."""
    if _kernel() is None:
        raise RuntimeError(f"the blocked fold kernel does not run here: {status()}")
    threads = torch.get_num_threads() if _state.get("omp") else 1
    prepared = [(w, o, B.float().contiguous(), A.float().contiguous(), tuple(shape), blk)
                for w, o, B, A, shape, blk in layers]
    return [not bad for bad in _blocked_call(_state["blocked"], prepared, exact, threads)]
