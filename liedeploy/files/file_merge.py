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

from liedeploy.core.adapter_file import AdapterFile, check_against_base, read_adapter
from liedeploy.core.algebra import check_finite, fold_sum
from liedeploy.io.sharded import layout_of, publish_sharded, shard_names
from liedeploy.io.dtypes import CLI_DTYPES, FLOAT_DTYPES, st_to_torch
from liedeploy.errors import AdapterFileError, LieError
from liedeploy.io.atomic import Staging, kill_point, terminate_on_signals
from liedeploy.progress import progress_bar
from liedeploy.io.safetensors_header import open_base_layout
from liedeploy.io.safetensors_io import DTYPE_NAMES, ST_DTYPES, SafetensorsFile

__all__ = ["merge_files", "DTYPE_ALIASES"]

DTYPE_ALIASES = {alias: st_to_torch(st) for alias, st in CLI_DTYPES.items()}  # --dtype values


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``src`` (a file object) to the end of ``dst``."""
    while count > 0:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), count, offset)
        except (AttributeError, OSError):
            n = 0
        if n <= 0:  # fallback: plain read/write
            while count > 0:
                chunk = os.pread(src.fileno(), min(count, 1 << 22), offset)
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
        self.zeros_base = self.zeros_kept = self.zeros_new = self.sign_flips = self.elements = 0
        self.targets: dict = {}
        self.full: dict = {}  # P -> (tensor, adapter path): tensors written whole (format "2")
        for a in adapters:
            for P, t in a.full.items():
                if P in self.full:
                    raise LieError(f"{self.full[P][1]} and {a.path} both replace {P}; merge one of them")
                self.full[P] = (t, a.path)
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

    def count_sparsity(self, W: torch.Tensor, O: torch.Tensor) -> None:
        """Zeros of the base kept, zeros the merge added, and signs it flipped (first_order only)."""
        zw, zo = W == 0, O == 0
        self.zeros_base += int(zw.sum())
        self.zeros_kept += int((zw & zo).sum())
        self.zeros_new += int((zo & ~zw).sum())
        self.sign_flips += int(((W > 0) & (O < 0)).sum() + ((W < 0) & (O > 0)).sum())
        self.elements += W.numel()

    def check(self, name: str, merged: torch.Tensor, ok: bool, W: Optional[torch.Tensor] = None) -> None:
        if ok:
            return
        factors = self.targets[name]["exact"] + self.targets[name]["first_order"]
        B = torch.cat([b * s for b, _, s in factors], 1)
        A = torch.cat([a for _, a, _ in factors], 0)
        check_finite(name, merged, B, A, 1.0, W=W)


def _full_tensor(plan, k, out_dtype) -> torch.Tensor:
    t = plan.full[k][0]
    return t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t


def _output_header(src: SafetensorsFile, order: list, plan, out_dtype, merged_from) -> tuple[dict, bytes, int]:
    """``(tensor entries, header bytes, data bytes)`` of a merged shard: the base's tensors in file
    order (full tensors with their own shape and dtype), the base's metadata plus the merge record."""
    header = src.header
    new_header, offset = {}, 0
    for k in order:
        if k in plan.full:  # replaced (or added) whole: its own shape and dtype
            t = _full_tensor(plan, k, out_dtype)
            dt, shape = DTYPE_NAMES[t.dtype], list(t.shape)
        else:
            info = header[k]
            dt, shape = info["dtype"], info["shape"]
            if out_dtype is not None and dt in FLOAT_DTYPES:
                dt = DTYPE_NAMES[out_dtype]
        nbytes = math.prod(shape) * ST_DTYPES[dt].itemsize
        new_header[k] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    new_meta = dict(src.metadata)
    new_meta["liedeploy.merged_from"] = json.dumps(merged_from)
    blob = json.dumps({"__metadata__": new_meta, **new_header}, separators=(",", ":")).encode()
    return new_header, blob + b" " * (-len(blob) % 8), offset


class _HashCheck:
    """Base-tensor hashes computed in a thread while the next tensor is read and folded; a
    mismatch found later still aborts before anything is published."""

    def __init__(self, adapters: list, pool):
        self.adapters, self.pool = adapters, pool

    def submit(self, view: torch.Tensor, name: str):
        return self.pool.submit(lambda: hashlib.sha256(view.numpy()).hexdigest()), name

    def settle(self, job) -> None:
        if job is None:
            return
        future, name = job
        got = future.result()
        for a in self.adapters:
            want = a.base_sha256.get(name)
            if want is not None and got != want:
                raise AdapterFileError(
                    f"{a.path}: base tensor {name} differs from the one this adapter was trained on "
                    f"(sha256 {got[:12]}... vs {want[:12]}...); pass --no-verify-base to merge anyway"
                )


def _merge_shard(src: SafetensorsFile, dst_path, plan, hashes, out_dtype, merged_from, bar, pool, counter, extra=()):
    header, data_start = src.header, src.data_start
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0]) + list(extra)
    new_header, blob, offset = _output_header(src, order, plan, out_dtype, merged_from)
    check = _HashCheck(hashes, pool)
    biggest_in = max([header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in order if k in header] + [1])
    biggest_out = max([v["data_offsets"][1] - v["data_offsets"][0] for v in new_header.values()] + [1])
    # two input buffers: a tensor's bytes are hashed in a thread while the next one is read and
    # folded; a mismatch found later still aborts before anything is published
    inbufs = [torch.empty(biggest_in, dtype=torch.uint8) for _ in range(2 if hashes else 1)]
    busy: list = [None] * len(inbufs)  # (future, tensor name) hashing each buffer
    outbuf = torch.empty(biggest_out, dtype=torch.uint8)
    n_merged = 0
    turn = 0
    fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    with open(fd, "wb", buffering=0) as dst:
        dst.write(len(blob).to_bytes(8, "little") + blob)
        pending = None  # a run of untouched tensors copied as one byte range
        for k in order:
            new = new_header[k]
            if k in plan.full:
                if pending:
                    _copy_range(src.file, dst, data_start + pending[0], pending[1] - pending[0])
                    pending = None
                t = _full_tensor(plan, k, out_dtype).contiguous()
                if t.numel():
                    dst.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                if k in header:
                    bar.update(header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
                continue
            info = header[k]
            b0, b1 = info["data_offsets"]
            same = info["dtype"] == new["dtype"] and k not in plan.targets
            if same:
                if pending and pending[1] == b0:
                    pending = (pending[0], b1)
                else:
                    if pending:
                        _copy_range(src.file, dst, data_start + pending[0], pending[1] - pending[0])
                    pending = (b0, b1)
                bar.update(b1 - b0)
                continue
            if pending:
                _copy_range(src.file, dst, data_start + pending[0], pending[1] - pending[0])
                pending = None
            check.settle(busy[turn])  # the buffer is free once its last hash is checked
            busy[turn] = None
            view = inbufs[turn][: b1 - b0]
            src.read_into(b0, view.numpy())
            shape = info["shape"]
            W = view.view(ST_DTYPES[info["dtype"]]).reshape(shape)
            o0, o1 = new["data_offsets"]
            O = outbuf[: o1 - o0].view(ST_DTYPES[new["dtype"]]).reshape(shape)
            if k in plan.targets:
                if hashes:
                    busy[turn] = check.submit(view, k)
                    turn = (turn + 1) % len(inbufs)
                finite = plan.fold(k, W, O)
                plan.check(k, O, finite, W)
                plan.count_sparsity(W, O)
                n_merged += 1
            else:
                O.copy_(W)
                if not torch.isfinite(O).all():
                    raise LieError(f"tensor {k} overflows {new['dtype']} when converted")
            dst.write(outbuf[: o1 - o0].numpy())
            bar.update(b1 - b0)
            counter[0] += 1
            kill_point(f"tensor:{counter[0]}")
        if pending:
            _copy_range(src.file, dst, data_start + pending[0], pending[1] - pending[0])
        for job in busy:
            check.settle(job)
    return n_merged, len(blob) + 8 + offset


def _read_request(adapters, scales, dtype) -> tuple[list, list, Optional[torch.dtype]]:
    """``(read adapters, one finite scale each, the output dtype or None)``; LieError otherwise."""
    if not adapters:
        raise LieError("merge needs at least one adapter file")
    loaded = [a if isinstance(a, AdapterFile) else read_adapter(os.fspath(a)) for a in adapters]
    scales = [1.0] * len(loaded) if scales is None else [float(s) for s in scales]
    if len(scales) != len(loaded):
        raise LieError(f"got {len(scales)} scales for {len(loaded)} adapters: give one --scale per adapter")
    if not all(math.isfinite(s) for s in scales):
        raise LieError(f"scales must be finite numbers, got {scales}")
    if isinstance(dtype, str):
        if dtype not in DTYPE_ALIASES:
            raise LieError(f"unknown dtype {dtype!r}: use fp32, fp16 or bf16")
        dtype = DTYPE_ALIASES[dtype]
    return loaded, scales, dtype


def _plan_against_base(loaded, scales, allow_mixed_maps, shapes, dtypes) -> "_Plan":
    """The merge plan, once every adapter fits the base (names, shapes, floating dtypes)."""
    for a in loaded:
        check_against_base(a, shapes, None)
        for P in a.targets:
            if dtypes[P] not in FLOAT_DTYPES:
                raise AdapterFileError(f"{a.path}: target {P} has dtype {dtypes[P]} in the base, not a floating-point type")
    plan = _Plan(loaded, scales, allow_mixed_maps)
    for P in plan.full:
        if P in plan.targets:
            raise LieError(f"{plan.full[P][1]} replaces {P} whole and another adapter adapts it; merge them separately")
    return plan


def _merged_index(index: dict, merged_from: list, dtype, shapes: dict, dtypes: dict) -> dict:
    """The output index's metadata: the merge record and, with a new dtype, the new total size."""
    index = dict(index)
    index["metadata"] = dict(index["metadata"]) if isinstance(index.get("metadata"), dict) else {}
    index["metadata"]["liedeploy.merged_from"] = json.dumps(merged_from)
    if dtype is not None:
        index["metadata"]["total_size"] = sum(
            math.prod(shapes[k]) * (dtype.itemsize if dtypes[k] in FLOAT_DTYPES else ST_DTYPES[dtypes[k]].itemsize)
            for k in shapes
        )
    return index


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
            (shards are written beside it, named as the base's shards, or with a fresh suffix
            where such a file already exists).
        scales: one factor per adapter (default 1.0 each; a negative scale removes a task).
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` (or a torch dtype) for every floating tensor;
            default: each tensor keeps the base's dtype.
        verify_base: check every target's bytes against the adapter's ``base_sha256``.
        allow_mixed_maps: allow exact and first_order adapters together (see module docs).
        progress: progress bar; default on a terminal only.

    Returns:
        A summary: ``{"out", "tensors", "tensors_merged", "bytes_written", "seconds", "merged_from"}``.

    Raises:
        AdapterFileError / LieError: bad adapter or base, hash or shape mismatch, non-finite result,
        an OUT that is an input or a special file, a full disk.
        All or nothing: a reader of ``out`` sees the complete old output or the complete new
        one, whatever happens (see :mod:`liedeploy.atomic`); ``base`` is never modified.

    Example:
        >>> merge_files("vit.safetensors", ["cats.safetensors"], "vit-cats.safetensors")
    """
    t0 = time.perf_counter()
    base, out = os.fspath(base), os.fspath(out)
    loaded, scales, dtype = _read_request(adapters, scales, dtype)
    index, shards = open_base_layout(base, out)
    sharded = index is not None
    inputs = [base] + list(shards) + [a.path for a in loaded]
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_on_signals())
        stage = stack.enter_context(Staging(out, inputs=inputs))
        files = {s: stack.enter_context(SafetensorsFile(s)) for s in shards}  # one descriptor per input
        shapes, dtypes = layout_of(base, files, shards)
        plan = _plan_against_base(loaded, scales, allow_mixed_maps, shapes, dtypes)
        merged_from = [
            {"name": a.name, "sha256": a.file_sha256, "scale": s, "expmap": a.expmap}
            for a, s in zip(loaded, scales)
        ]
        total = sum(f.size for f in files.values())
        n_merged = n_tensors = written = 0
        pool = stack.enter_context(cf.ThreadPoolExecutor(1))
        bar = stack.enter_context(progress_bar(desc="merge", total=total, enabled=progress, unit="B"))
        names = shard_names(shards, stage.folder) if sharded else {base: stage.name}
        counter = [0]
        added = [P for P in plan.full if P not in shapes]  # full tensors the base lacks: in the first shard
        for i, (s, f) in enumerate(files.items()):
            m, w = _merge_shard(f, stage.path(names[s]), plan, loaded if verify_base else [], dtype, merged_from,
                                bar, pool, counter, extra=added if i == 0 else ())
            n_merged += m
            n_tensors += len(f.header)
            written += w
        if sharded:
            index = _merged_index(index, merged_from, dtype, shapes, dtypes)
            first = names[next(iter(shards))]
            publish_sharded(stage, index, names, shards, inputs, extra={P: first for P in added}, hook=kill_point)
        else:
            stage.publish([stage.name], last=stage.name, hook=kill_point)
    return {
        "out": out,
        "tensors": n_tensors,
        "tensors_merged": n_merged,
        "bytes_written": written,
        "seconds": round(time.perf_counter() - t0, 4),
        "merged_from": merged_from,
        "tensors_replaced": len(plan.full),
        # over the merged tensors: every zero of the base is kept (W * exp(dW) is 0 where W is);
        # new zeros only from underflow; first_order flips a sign where 1 + dW < 0
        "sparsity": {"elements": plan.elements, "zeros_base": plan.zeros_base, "zeros_kept": plan.zeros_kept,
                     "zeros_new": plan.zeros_new, "sign_flips": plan.sign_flips},
    }
