"""``prune_files``: magnitude pruning of safetensors weights, streaming and all-or-nothing (numpy only).

Unstructured (``sparsity=S``: the S fraction of smallest magnitudes of each tensor become zero) or
N:M (``pattern="2:4"``: in every group of M consecutive weights along the reduction axis, the N
smallest become zero; see :mod:`liedeploy.sparsity` for the layout). A Lie adapter trained on the
pruned base keeps every zero in every task's merged model (W * exp(dW) is zero where W is).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from typing import Optional

import numpy as np

from liedeploy.io.atomic import Staging, kill_point, terminate_on_signals
from liedeploy.io.dtypes import FLOAT_DTYPES, numpy_storage
from liedeploy.io.sharded import layout_of, publish_sharded, shard_names
from liedeploy.errors import ConfigError
from liedeploy.io.safetensors_header import SafetensorsFile, open_base_layout
from liedeploy.files.sparsity import as_float, magnitude_mask, nm_applicable, nm_conforms, nm_mask, zero_mask

__all__ = ["prune_files", "parse_pattern"]



def parse_pattern(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", str(text))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--pattern must be N:M with 0 < N < M (2:4 for sparse tensor cores), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _prune_file(src: SafetensorsFile, dst_path: str, keep_fn, select, report: dict, counter: list) -> None:
    order = sorted(src.header, key=lambda k: src.header[k]["data_offsets"][0])
    head = os.pread(src.file.fileno(), src.data_start, 0)
    fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(fd, "wb", buffering=0) as dst:
        dst.write(head)  # same header: pruning changes values, not shapes, dtypes or offsets
        for k in order:
            info = src.header[k]
            b0, b1 = info["data_offsets"]
            buf = np.empty(b1 - b0, dtype=np.uint8)
            if b1 > b0:
                src.read_into(b0, buf)
            if select(k, info):
                a = buf.view(numpy_storage(info["dtype"])).reshape(info["shape"])
                keep = keep_fn(as_float(a, info["dtype"]))
                if keep is None:
                    report["skipped"][k] = "its reduction axis does not divide into groups"
                else:
                    a[~keep] = 0
                    z = zero_mask(a, info["dtype"])
                    report["tensors"][k] = {"sparsity": float(z.mean()) if z.size else 0.0,
                                            "2:4": nm_conforms(z, 2, 4)}
                    report["_zeros"] += int(z.sum())
                    report["_elements"] += int(z.size)
                    counter[0] += 1
                    kill_point(f"tensor:{counter[0]}")
            dst.write(buf.tobytes())


def prune_files(base: str, out: str, *, sparsity: Optional[float] = None, pattern: Optional[str] = None,
                targets: Optional[str] = None) -> dict:
    """Prune ``base`` (a file or a sharded index) into ``out``; returns the per-tensor and total sparsity.

    Args:
        sparsity: fraction in (0, 1) of each tensor's smallest magnitudes set to zero.
        pattern: ``"N:M"`` (e.g. ``"2:4"``) instead of ``sparsity``.
        targets: a regex over tensor names (default: every floating tensor of rank >= 2).
    """
    t0 = time.perf_counter()
    if (sparsity is None) == (pattern is None):
        raise ConfigError("give exactly one of --sparsity S or --pattern N:M")
    if sparsity is not None and not 0 < float(sparsity) < 1:
        raise ConfigError(f"--sparsity must be in (0, 1), got {sparsity}")
    rx = None
    if targets is not None:
        try:
            rx = re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"--targets {targets!r} is not a valid regex: {exc}") from None
    if pattern is not None:
        n, m = parse_pattern(pattern)

        def keep_fn(v):
            return nm_mask(v, n, m) if nm_applicable(v.shape, m) else None
    else:
        def keep_fn(v):
            return magnitude_mask(v, float(sparsity))

    def select(name, info):
        if info["dtype"] not in FLOAT_DTYPES or len(info["shape"]) < 2 or math.prod(info["shape"]) == 0:
            return False
        return rx.fullmatch(name) is not None if rx is not None else True

    index, shards = open_base_layout(base, out)
    sharded = index is not None
    report = {"tensors": {}, "skipped": {}, "_zeros": 0, "_elements": 0}
    inputs = [base] + list(shards)
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_on_signals())
        stage = stack.enter_context(Staging(out, inputs=inputs))
        files = {s: stack.enter_context(SafetensorsFile(s)) for s in shards}  # one descriptor per input
        layout_of(base, files, shards)
        names = shard_names(shards, stage.folder) if sharded else {base: stage.name}
        counter = [0]
        for s, f in files.items():
            _prune_file(f, stage.path(names[s]), keep_fn, select, report, counter)
        if sharded:
            publish_sharded(stage, index, names, shards, inputs, hook=kill_point)
        else:
            stage.publish([stage.name], last=stage.name, hook=kill_point)
    zeros, elements = report.pop("_zeros"), report.pop("_elements")
    report.update({"out": out, "method": f"N:M {pattern}" if pattern else f"unstructured {float(sparsity):g}",
                   "total_sparsity": zeros / max(elements, 1), "pruned_tensors": len(report["tensors"]),
                   "seconds": round(time.perf_counter() - t0, 4)})
    return report
