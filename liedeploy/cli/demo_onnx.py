"""The demo's deployment step: export each merged task model and one bank graph to ONNX, and score
every task in ONNX Runtime."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from liedeploy.demo.pipeline import TASKS, DigitsNet, load_digits_tensors, task_labels


__all__ = ["run_demo_onnx"]


def run_demo_onnx(summary: dict, out_dir: str, seed: int = 0, log: Callable[[str], None] = print) -> list:
    """Export every task's merged weights (dynamic batch, verified) and report ORT accuracy per task."""
    from liedeploy.exporters.bank_graph import BankSession, export_bank_graph  # the onnx stack: the CLI layer, only when run
    from liedeploy.exporters.onnx import export_onnx

    import onnxruntime as ort

    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 4
    xte, yte = x[:n_test], y[:n_test]
    rows = []
    for r in summary["tasks"]:
        sd = load_file(r["merged_file"])
        model = DigitsNet(classes=int(sd["head.weight"].shape[0]))
        model.load_state_dict(sd)
        model.eval()
        path = os.path.join(out_dir, f"{r['task']}.onnx")
        report = export_onnx(model, torch.zeros(1, 1, 8, 8), path, dynamic_batch=True)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        te = TASKS[r["task"]](xte).numpy().astype(np.float32)
        logits = sess.run(None, {sess.get_inputs()[0].name: te})[0]
        acc = float((logits.argmax(-1) == task_labels(r["task"], yte).numpy()).mean())
        r["onnx_file"] = path
        r["onnx_accuracy"] = acc
        rows.append((r["task"], r["merged_accuracy"], acc, max(o["max_abs"] for c in report["checks"] for o in c["outputs"])))
    # one switchable bank graph for the tasks that share the base's head, one .onnx_adapter each
    # (a task with a head of its own is refused by the bank graph: it has its merged model above)
    base = DigitsNet()
    base.load_state_dict(load_file(summary["base_file"]))
    bank_path = os.path.join(out_dir, "bank.onnx")
    shared = [r for r in summary["tasks"] if not r.get("new_head")]
    for r in summary["tasks"]:
        r["onnx_bank_accuracy"] = None
    if shared:
        export_bank_graph(base.eval(), torch.zeros(1, 1, 8, 8), bank_path, [r["adapter_file"] for r in shared],
                          dynamic_batch=True)
        bank = BankSession(bank_path)
    for r in shared:
        adapter = os.path.join(out_dir, f"{r['task']}.onnx_adapter")
        logits = bank.run(TASKS[r["task"]](xte), adapter=adapter)[0]
        r["onnx_bank_accuracy"] = float((logits.argmax(-1) == yte.numpy()).mean())
    log("")
    log(f"{'task':<10} {'torch merged':>13} {'ORT merged':>11} {'ORT bank graph':>15} {'max |ORT-torch|':>16}")
    for i, (task, t_acc, o_acc, err) in enumerate(rows):
        b = summary["tasks"][i]["onnx_bank_accuracy"]
        log(f"{task:<10} {t_acc:>13.1%} {o_acc:>11.1%} {(f'{b:.1%}' if b is not None else 'own head'):>15} {err:>16.2e}")
    log(f"(ORT merged: one exported model per task; ORT bank graph: {os.path.basename(bank_path)} with one "
        ".onnx_adapter per task, activated per run)")
    return rows
