"""Per-task merged ONNX models that share the base's weights on disk.

For hot tasks a merged graph is the fastest thing ONNX Runtime can run (constant weights,
pre-packed). ``export_task_models`` writes ``base.onnx`` with its weights in ``base.onnx.data`` and,
per task, ``<task>.onnx`` whose initializers point into ``base.onnx.data`` wherever their bytes
equal the base's and into ``<task>.onnx.data`` only where they differ: bytes per extra task =
the tensors the adapter changed (plus the exporter's derived tensors of those, e.g. a Conv with a
folded BatchNorm) and a small graph. Each file is verified in ONNX Runtime against torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
from typing import Optional, Sequence

import torch
from torch import nn

from liedeploy.core.adapter_file import load_adapter, read_adapter
from liedeploy.io.atomic import Staging, kill_point, safe_file_name
from liedeploy.errors import ConfigError, ExportError, OutputPathError
from liedeploy.core.merge import merge_

from liedeploy.exporters.onnx import DEFAULT_OPSET, require_onnx, export_onnx, verify_onnx

__all__ = ["export_task_models", "shared_initializers"]

_ALIGN = 64


def _externalize(proto, folder: str, data_name: str, shared: dict, shared_name: str) -> int:
    """Point each initializer at ``shared`` bytes if equal, else append it to ``data_name``."""
    from onnx import TensorProto, numpy_helper

    own = 0
    with open(os.path.join(folder, data_name), "wb") as f:
        for t in proto.graph.initializer:
            raw = numpy_helper.to_array(t).tobytes()
            if len(raw) < 1024:  # small tensors stay inline in the graph
                continue
            digest = hashlib.sha256(raw).hexdigest()
            hit = shared.get(digest)
            if hit is not None:
                location, offset = shared_name, hit
            else:
                pad = (-f.tell()) % _ALIGN
                f.write(b"\0" * pad)
                location, offset = data_name, f.tell()
                f.write(raw)
                own += len(raw)
                if shared_name == data_name:
                    shared[digest] = offset
            dims, dtype = list(t.dims), t.data_type
            name = t.name
            t.Clear()
            t.name, t.data_type = name, dtype
            t.dims.extend(dims)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    return own


def shared_initializers(paths: Sequence[str]) -> dict:
    """``{initializer name: (data file, offset, length)}`` common to all the given task models."""
    import onnx

    common = None
    for p in paths:
        proto = onnx.load(p, load_external_data=False)
        refs = {}
        for t in proto.graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            if info:
                refs[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
        common = refs if common is None else {k: v for k, v in common.items() if refs.get(k) == v}
    return common or {}


def export_task_models(
    model: nn.Module,
    example_inputs,
    out_dir: str,
    adapters: Sequence[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    verify_base: bool = True,
    quantize: Optional[str] = None,
    calibration=None,
) -> dict:
    """Write ``base.onnx`` and one merged ``<task>.onnx`` per adapter into ``out_dir``, sharing weights.

    Returns a report with, per file, the check results and its own bytes on disk.
    """
    onnx = require_onnx("onnx")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputPathError(f"{out_dir}: exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    afs = [read_adapter(a) for a in adapters]
    # task names come from the files' metadata: reduced to plain file names, never used as paths
    names = [safe_file_name(af.name, "task name") for af in afs]
    if len(set(names)) != len(names) or "base" in names:
        raise ConfigError(f"task names must be unique and not 'base' (as file names), got {names}")
    token = secrets.token_hex(4)
    taken = lambda n: os.path.lexists(os.path.join(out_dir, n))  # noqa: E731
    data_name = {n: (f"{n}.onnx.{token}.data" if taken(f"{n}.onnx.data") else f"{n}.onnx.data") for n in ["base"] + names}
    obsolete = _data_files([os.path.join(out_dir, f"{n}.onnx") for n in ["base"] + names])
    with Staging(os.path.join(out_dir, "tasks.report.json"), inputs=list(adapters)) as stage:
        tmp = stage.dir
        work = os.path.join(tmp, "work")
        os.makedirs(work)
        base = copy.deepcopy(model).eval()
        models = {"base": base}
        for name, path in zip(names, adapters):
            models[name] = merge_(load_adapter(copy.deepcopy(model).eval(), path, verify_base=verify_base), keep_base=False)
        report = {"ok": True, "files": {}}
        shared: dict = {}
        for name, m in models.items():
            p = os.path.join(work, f"{name}.onnx")
            export_onnx(m, example_inputs, p, opset=opset, dynamic_batch=dynamic_batch, atol=atol, rtol=rtol,
                        quantize=quantize, calibration=calibration)
            proto = onnx.load(p, load_external_data=True)
            own = _externalize(proto, tmp, data_name[name], shared, data_name["base"])
            final = os.path.join(tmp, f"{name}.onnx")
            onnx.save(proto, final)
            if own == 0 and name != "base":
                os.unlink(os.path.join(tmp, data_name[name]))
            b = int(example_inputs[0].shape[0]) if example_inputs[0].dim() else 1
            with open(p + ".report.json") as f:
                first = json.load(f)
            if quantize:  # int8: the shared-bytes graph must compute exactly what the checked int8 graph did
                check = _same_outputs(p, final, calibration[: max(1, min(len(calibration), 8))])
                check["int8"] = first.get("int8")
            else:
                check = verify_onnx(final, m, example_inputs, batches=(None, b + 2) if dynamic_batch else (None,),
                                    atol=first["atol"], rtol=first["rtol"])
            if not check["ok"]:
                raise ExportError(f"{name}.onnx with shared weights disagrees with torch; nothing was written")
            report["files"][name] = {
                "check": check,
                "graph_bytes": os.path.getsize(final),
                "own_data_bytes": own,
            }
        shutil.rmtree(work)
        with open(os.path.join(tmp, "tasks.report.json"), "w") as f:
            json.dump(report, f, indent=2)
        # data files first, then the graphs that point at them, the report last; data files of the
        # graphs replaced here are removed after (a reader of any .onnx sees old or new, whole)
        files = stage.staged_files()
        order = [f for f in files if not f.endswith((".onnx", ".json"))] + [f for f in files if f.endswith(".onnx")]
        new = set(files)
        stage.publish(order + ["tasks.report.json"], last="tasks.report.json",
                      obsolete=[o for o in obsolete if o not in new], hook=kill_point)
        return report


def _same_outputs(a: str, b: str, x) -> dict:
    import numpy as np

    ort = require_onnx("onnxruntime")
    sa = ort.InferenceSession(a, providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(b, providers=["CPUExecutionProvider"])
    first = sa.get_inputs()[0]
    if isinstance(first.shape[0], int):  # a fixed batch
        x = x[: first.shape[0]]
    feed = {first.name: x}
    ra, rb = sa.run(None, feed), sb.run(None, feed)
    ok = all(np.array_equal(u, v) for u, v in zip(ra, rb))
    return {"ok": bool(ok), "same_as_checked_int8_graph": bool(ok)}


def _data_files(graphs: Sequence[str]) -> list:
    """External data file names that the existing ONNX graphs ``graphs`` point at."""
    import onnx

    out = set()
    for g in graphs:
        if not os.path.isfile(g):
            continue
        try:
            proto = onnx.load(g, load_external_data=False)
        except Exception:  # noqa: BLE001 - an unreadable old graph is simply replaced
            continue
        for t in proto.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    out.add(os.path.basename(e.value))
    return sorted(out)
