"""``merge_files``: merge adapter files into safetensors base weights, streaming, with no model code.

Keys, shapes and the adapter format say everything: each adapted tensor is read once into a
reused buffer, its hash is checked, it is folded block by block and written; every other tensor's
bytes are copied as they are (``copy_file_range``: no conversion, no Python). Output goes to
temporary files beside OUT that are renamed only when everything succeeded.

Composition (documented in the README):
- exact adapters compose in the Lie algebra: W * exp(sum_i s_i dW_i) (exact group product);
- first_order adapters compose additively: W * (1 + sum_i s_i dW_i) = W + sum_i s_i W * dW_i, the
  sum of each adapter's own update (what PEFT's linear combination of HiRA adapters gives);
- mixing the two is refused unless ``allow_mixed_maps=True``: then W * exp(sum exact) * (1 + sum first_order).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import math
import os
import time
from typing import Optional, Sequence, Union

import torch

from .adapter_file import AdapterFile, check_against_base, read_adapter
from .algebra import check_finite, fold_sum
from .errors import AdapterFileError, LieError
from .progress import progress_bar
from .sfile import DTYPE_NAMES, ST_DTYPES, atomic_path, read_header, resolve_shards

__all__ = ["merge_files", "DTYPE_ALIASES"]

DTYPE_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_FLOAT = {"F64", "F32", "F16", "BF16"}


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy_range(src, dst, offset: int, count: int) -> None:
    while count > 0:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), count, offset)
        except (AttributeError, OSError):
            n = 0
        if n <= 0:  # fallback: plain read/write
            src.seek(offset)
            while count > 0:
                chunk = src.read(min(count, 1 << 22))
                if not chunk:
                    raise AdapterFileError(f"{src.name}: truncated while copying")
                dst.write(chunk)
                offset += len(chunk)
                count -= len(chunk)
            return
        offset += n
        count -= n


class _Plan:
    """Per-target factor lists, grouped by map, scales applied."""

    def __init__(self, adapters: list, scales: list, allow_mixed: bool):
        maps = {a.expmap for a in adapters}
        if len(maps) > 1 and not allow_mixed:
            ex = next(a for a in adapters if a.expmap == "exact")
            fo = next(a for a in adapters if a.expmap == "first_order")
            raise LieError(
                f"{ex.path} uses the exact map and {fo.path} the first_order map; they do not compose "
                "exactly: pass --allow-mixed-maps (allow_mixed_maps=True) to get W * exp(sum exact) * (1 + sum first_order)"
            )
        self.targets: dict = {}
        for a, s in zip(adapters, scales):
            for P, (B, A) in a.factors.items():
                self.targets.setdefault(P, {"exact": [], "first_order": []})[a.expmap].append(
                    (B, A, a.targets[P]["scale"] * s)
                )

    def fold(self, name: str, W: torch.Tensor, out: torch.Tensor) -> bool:
        """Fold into ``out``; returns whether every merged value is finite."""
        groups = self.targets[name]
        ok: list = []
        if groups["exact"] and groups["first_order"]:
            tmp = fold_sum(W, groups["exact"], "exact", out_dtype=torch.float32 if W.dtype != torch.float64 else W.dtype)
            fold_sum(tmp, groups["first_order"], "first_order", out=out, check=ok)
        elif groups["exact"]:
            fold_sum(W, groups["exact"], "exact", out=out, check=ok)
        else:
            fold_sum(W, groups["first_order"], "first_order", out=out, check=ok)
        return ok[0]

    def check(self, name: str, merged: torch.Tensor, ok: bool) -> None:
        if ok:
            return
        factors = self.targets[name]["exact"] + self.targets[name]["first_order"]
        B = torch.cat([b * s for b, _, s in factors], 1)
        A = torch.cat([a for _, a, _ in factors], 0)
        check_finite(name, merged, B, A, 1.0)


def _merge_shard(src_path, header, meta, data_start, dst_path, plan, hashes, out_dtype, merged_from, bar, pool):
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    new_header, offset = {}, 0
    for k in order:
        info = header[k]
        dt = info["dtype"]
        if out_dtype is not None and dt in _FLOAT:
            dt = DTYPE_NAMES[out_dtype]
        nbytes = math.prod(info["shape"]) * ST_DTYPES[dt].itemsize
        new_header[k] = {"dtype": dt, "shape": info["shape"], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    new_meta = dict(meta)
    new_meta["liedeploy.merged_from"] = json.dumps(merged_from)
    blob = json.dumps({"__metadata__": new_meta, **new_header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    biggest_in = max([header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in order] + [1])
    biggest_out = max([v["data_offsets"][1] - v["data_offsets"][0] for v in new_header.values()] + [1])
    # two input buffers: a tensor's bytes are hashed in a thread while the next one is read and
    # folded; a mismatch found later still aborts before anything is renamed onto OUT
    inbufs = [torch.empty(biggest_in, dtype=torch.uint8) for _ in range(2 if hashes else 1)]
    busy: list = [None] * len(inbufs)  # (future, tensor name) hashing each buffer
    outbuf = torch.empty(biggest_out, dtype=torch.uint8)
    n_merged = 0
    turn = 0

    def settle(job) -> None:
        if job is None:
            return
        future, name = job
        got = future.result()
        for a in hashes:
            want = a.base_sha256.get(name)
            if want is not None and got != want:
                raise AdapterFileError(
                    f"{a.path}: base tensor {name} differs from the one this adapter was trained on "
                    f"(sha256 {got[:12]}... vs {want[:12]}...); pass --no-verify-base to merge anyway"
                )

    with open(src_path, "rb", buffering=0) as src, open(dst_path, "wb", buffering=0) as dst:
        dst.write(len(blob).to_bytes(8, "little") + blob)
        pending = None  # a run of untouched tensors copied as one byte range
        for k in order:
            info, new = header[k], new_header[k]
            b0, b1 = info["data_offsets"]
            same = info["dtype"] == new["dtype"] and k not in plan.targets
            if same:
                if pending and pending[1] == b0:
                    pending = (pending[0], b1)
                else:
                    if pending:
                        _copy_range(src, dst, data_start + pending[0], pending[1] - pending[0])
                    pending = (b0, b1)
                bar.update(b1 - b0)
                continue
            if pending:
                _copy_range(src, dst, data_start + pending[0], pending[1] - pending[0])
                pending = None
            settle(busy[turn])  # the buffer is free once its last hash is checked
            busy[turn] = None
            view = inbufs[turn][: b1 - b0]
            src.seek(data_start + b0)
            got = src.readinto(view.numpy())
            if got != b1 - b0:
                raise AdapterFileError(f"{src_path}: truncated: tensor {k} is short of bytes")
            shape = info["shape"]
            W = view.view(ST_DTYPES[info["dtype"]]).reshape(shape)
            o0, o1 = new["data_offsets"]
            O = outbuf[: o1 - o0].view(ST_DTYPES[new["dtype"]]).reshape(shape)
            if k in plan.targets:
                if hashes:
                    busy[turn] = (pool.submit(lambda v=view: hashlib.sha256(v.numpy()).hexdigest()), k)
                    turn = (turn + 1) % len(inbufs)
                finite = plan.fold(k, W, O)
                plan.check(k, O, finite)
                n_merged += 1
            else:
                O.copy_(W)
                if not torch.isfinite(O).all():
                    raise LieError(f"tensor {k} overflows {new['dtype']} when converted")
            dst.write(outbuf[: o1 - o0].numpy())
            bar.update(b1 - b0)
        if pending:
            _copy_range(src, dst, data_start + pending[0], pending[1] - pending[0])
        for job in busy:
            settle(job)
    return n_merged, len(blob) + 8 + offset


def merge_files(
    base: str,
    adapters: Sequence[Union[str, AdapterFile]],
    out: str,
    scales: Optional[Sequence[float]] = None,
    dtype: Union[None, str, torch.dtype] = None,
    *,
    verify_base: bool = True,
    allow_mixed_maps: bool = False,
    progress: Optional[bool] = None,
) -> dict:
    """Merge adapter files into a safetensors base and write the merged weights to ``out``.

    Args:
        base: a ``.safetensors`` file or a sharded ``*.safetensors.index.json``.
        adapters: adapter files (paths or :class:`AdapterFile`).
        out: output ``.safetensors`` path; for a sharded base, an ``*.safetensors.index.json`` path
            (shards are written beside it with the base's shard file names).
        scales: one factor per adapter (default 1.0 each; a negative scale removes a task).
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` (or a torch dtype) for every floating tensor;
            default: each tensor keeps the base's dtype.
        verify_base: check every target's bytes against the adapter's ``base_sha256``.
        allow_mixed_maps: allow exact and first_order adapters together (see module docs).
        progress: progress bar; default on a terminal only.

    Returns:
        A summary: ``{"out", "tensors", "tensors_merged", "bytes_written", "seconds", "merged_from"}``.

    Raises:
        AdapterFileError / LieError: bad adapter or base, hash or shape mismatch, non-finite result.
        Nothing exists at ``out`` afterwards unless the call succeeded; ``base`` is never modified.

    Example:
        >>> merge_files("vit.safetensors", ["cats.safetensors"], "vit-cats.safetensors")
    """
    t0 = time.perf_counter()
    base, out = os.fspath(base), os.fspath(out)
    if not adapters:
        raise LieError("merge needs at least one adapter file")
    loaded = [a if isinstance(a, AdapterFile) else read_adapter(os.fspath(a)) for a in adapters]
    if scales is None:
        scales = [1.0] * len(loaded)
    scales = [float(s) for s in scales]
    if len(scales) != len(loaded):
        raise LieError(f"got {len(scales)} scales for {len(loaded)} adapters: give one --scale per adapter")
    if not all(math.isfinite(s) for s in scales):
        raise LieError(f"scales must be finite numbers, got {scales}")
    if isinstance(dtype, str):
        if dtype not in DTYPE_ALIASES:
            raise LieError(f"unknown dtype {dtype!r}: use fp32, fp16 or bf16")
        dtype = DTYPE_ALIASES[dtype]
    sharded = base.endswith(".index.json")
    if sharded:
        if not out.endswith(".safetensors.index.json"):
            raise LieError(f"{base} is sharded: OUT must be a *.safetensors.index.json path, got {out}")
        shards = resolve_shards(base)
        out_dir = os.path.dirname(os.path.abspath(out))
        outputs = {s: os.path.join(out_dir, os.path.basename(s)) for s in shards}
    else:
        shards = {base: None}
        outputs = {base: out}
    for s, o in outputs.items():
        if os.path.exists(o) and os.path.exists(s) and os.path.samefile(s, o):
            raise LieError(f"{o} is the base file itself: write the merged weights elsewhere (the base is never modified)")
    if sharded and os.path.exists(out) and os.path.samefile(out, base):
        raise LieError(f"{out} is the base index itself: write the merged weights elsewhere")
    headers = {s: read_header(s) for s in shards}
    shapes = {k: tuple(v["shape"]) for h, _, _ in headers.values() for k, v in h.items()}
    dtypes = {k: v["dtype"] for h, _, _ in headers.values() for k, v in h.items()}
    for a in loaded:
        check_against_base(a, shapes, None)
        for P in a.targets:
            if dtypes[P] not in _FLOAT:
                raise AdapterFileError(f"{a.path}: target {P} has dtype {dtypes[P]} in the base, not a floating-point type")
    plan = _Plan(loaded, scales, allow_mixed_maps)
    merged_from = [
        {"name": a.name, "sha256": _file_sha256(a.path), "scale": s, "expmap": a.expmap}
        for a, s in zip(loaded, scales)
    ]
    total = sum(os.path.getsize(s) for s in shards)
    n_merged = n_tensors = written = 0
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(cf.ThreadPoolExecutor(1))
        bar = stack.enter_context(progress_bar(desc="merge", total=total, enabled=progress, unit="B"))
        # every shard goes to a temporary file that is renamed only if all shards succeed;
        # a sharded index is written last, after its shards exist
        tmps = {s: stack.enter_context(atomic_path(outputs[s])) for s in shards}
        for s in shards:
            header, meta, data_start = headers[s]
            m, w = _merge_shard(
                s, header, meta, data_start, tmps[s], plan, loaded if verify_base else [], dtype, merged_from, bar, pool
            )
            n_merged += m
            n_tensors += len(header)
            written += w
    if sharded:
        with open(base) as f:
            index = json.load(f)
        index.setdefault("metadata", {})
        index["metadata"]["liedeploy.merged_from"] = json.dumps(merged_from)
        if dtype is not None:
            index["metadata"]["total_size"] = sum(
                math.prod(shapes[k]) * (dtype.itemsize if dtypes[k] in _FLOAT else ST_DTYPES[dtypes[k]].itemsize)
                for k in shapes
            )
        with atomic_path(out) as tmp:
            with open(tmp, "w") as f:
                json.dump(index, f, indent=2)
    return {
        "out": out,
        "tensors": n_tensors,
        "tensors_merged": n_merged,
        "bytes_written": written,
        "seconds": round(time.perf_counter() - t0, 4),
        "merged_from": merged_from,
    }
