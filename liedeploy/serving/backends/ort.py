"""The serving backend over ONNX Runtime (``liedeploy serve --backend ort``).

Serves the folder that ``liedeploy export --onnx --task-models`` (``base.onnx`` + ``<task>.onnx``)
and/or ``--bank`` (a bank graph + ``.onnx_adapter`` files) wrote, through
:class:`exporters.ort_bank.OrtAdapterBank`, with the serving layer's backend protocol.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from liedeploy.errors import ConfigError, LieError
from liedeploy.serving.specs import TensorSpec

__all__ = ["OrtBackend"]

_ORT_TYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(int64)": "INT64",
              "tensor(int32)": "INT32", "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL"}


def _spec(arg) -> TensorSpec:
    dt = _ORT_TYPES.get(arg.type)
    if dt is None:
        raise ConfigError(f"ONNX input/output {arg.name} has type {arg.type}, which the server does not serve")
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, dt, (-1,) + shape[1:] if shape else shape)


class OrtBackend:
    """:class:`liedeploy.serving.backend.Backend` over an export folder, in ONNX Runtime (CPU)."""

    kind = "ort"
    file_suffix = ".onnx"

    def __init__(self, folder: str, *, max_sessions: int = 8, threads: int = 0):
        from liedeploy.exporters.ort_bank import OrtAdapterBank  # the onnx stack: only when built

        if not os.path.isdir(folder):
            raise ConfigError(f"{folder}: not a folder")
        graphs = sorted(f for f in os.listdir(folder) if f.endswith(".onnx.bank.json"))
        task_models = folder if os.path.exists(os.path.join(folder, "base.onnx")) else None
        bank_graph = os.path.join(folder, graphs[0][: -len(".bank.json")]) if graphs else None
        if task_models is None and bank_graph is None:
            raise ConfigError(f"{folder}: holds neither base.onnx (--task-models) nor a bank graph (--bank)")
        self.bank = OrtAdapterBank(task_models=task_models, bank_graph=bank_graph, max_sessions=max_sessions,
                                   threads=threads)
        self.folder = folder
        sess = self.bank.session_for(None)
        self._inputs = [_spec(i) for i in sess.get_inputs() if not i.name.endswith((".lie_A", ".lie_B"))]

    def tasks(self) -> list:
        return self.bank.tasks

    def discover(self, folder: str) -> dict:
        """``{task: file}`` of the export folder (what the repository index and load use)."""
        out = {}
        for f in sorted(os.listdir(folder)):
            if f.endswith(".onnx") and f != "base.onnx" and not os.path.exists(os.path.join(folder, f + ".bank.json")):
                out[f[: -len(".onnx")]] = os.path.join(folder, f)
        return out

    def add(self, task: str, path: str) -> None:
        if path.endswith(".onnx_adapter"):
            self.bank.add(task, path)
        elif path.endswith(".onnx"):
            self.bank.add_task_model(task, path)
        else:
            raise LieError(f"{path}: the ort backend serves <task>.onnx or <task>.onnx_adapter files")

    def remove(self, task: str) -> None:
        self.bank.remove(task)

    def prefetch(self, task: str) -> None:
        self.bank.session_for(task)

    def is_resident(self, task: Optional[str]) -> bool:
        return self.bank.is_hot(task)

    def inputs(self) -> list:
        return list(self._inputs)

    def outputs(self, task: Optional[str]) -> list:
        return [_spec(o) for o in self.bank.session_for(task).get_outputs()]

    def run(self, task: Optional[str], inputs: dict) -> dict:
        return self.bank.run_feeds(task, {k: np.ascontiguousarray(v) for k, v in inputs.items()})

    def run_mixed(self, tasks, inputs: dict) -> dict:
        from liedeploy.serving.backend import run_mixed_by_task

        return run_mixed_by_task(self.run, tasks, inputs)

    def stats(self) -> dict:
        s = self.bank.stats
        resident = len(self.bank.hot_tasks)
        return {"registered": len(self.bank.tasks), "resident": resident, "resident_bytes": 0,
                "hits": s["session_hits"], "misses": s["sessions_built"], "evictions": s["evictions"],
                "loads": s["sessions_built"], "load_seconds": s["build_seconds"], "not_kept": s["not_kept"]}
