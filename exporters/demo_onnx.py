"""The demo's deployment step: export each merged task model to ONNX and score it in ONNX Runtime."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from liedeploy.demo import TASKS, DigitsNet, load_digits_tensors

from .onnx import export_onnx

__all__ = ["run_demo_onnx"]


def run_demo_onnx(summary: dict, out_dir: str, seed: int = 0, log: Callable[[str], None] = print) -> list:
    """Export every task's merged weights (dynamic batch, verified) and report ORT accuracy per task."""
    import onnxruntime as ort

    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 4
    xte, yte = x[:n_test], y[:n_test]
    rows = []
    for r in summary["tasks"]:
        model = DigitsNet()
        model.load_state_dict(load_file(r["merged_file"]))
        model.eval()
        path = os.path.join(out_dir, f"{r['task']}.onnx")
        report = export_onnx(model, torch.zeros(1, 1, 8, 8), path, dynamic_batch=True)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        te = TASKS[r["task"]](xte).numpy().astype(np.float32)
        logits = sess.run(None, {sess.get_inputs()[0].name: te})[0]
        acc = float((logits.argmax(-1) == yte.numpy()).mean())
        r["onnx_file"] = path
        r["onnx_accuracy"] = acc
        rows.append((r["task"], r["merged_accuracy"], acc, max(o["max_abs"] for c in report["checks"] for o in c["outputs"])))
    log("")
    log(f"{'task':<10} {'torch merged':>13} {'ONNX Runtime':>13} {'max |ORT-torch|':>16}")
    for task, t_acc, o_acc, err in rows:
        log(f"{task:<10} {t_acc:>13.1%} {o_acc:>13.1%} {err:>16.2e}")
    return rows
