"""The demo's compressed track: prune the pretrained base (50% unstructured and 2:4), train the task
adapters on each pruned base, export int8 per-task models, and report per task accuracy dense vs
pruned vs pruned + int8, the sparsity of every merged model, and bytes on disk for N tasks."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from liedeploy.demo.pipeline import TASKS, DigitsNet, split_digits, task_labels, train_task
from liedeploy.files.prune import prune_files

__all__ = ["run_demo_compressed"]


def _folder_bytes(folder: str, suffixes=(".onnx", ".data")) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(suffixes))


def run_demo_compressed(summary: dict, out_dir: str, *, epochs: int = 15, r: int = 4, seed: int = 0,
                        log: Callable[[str], None] = print) -> dict:
    import onnxruntime as ort

    from liedeploy.exporters.task_models import export_task_models  # the onnx stack: the CLI layer, only when run

    xtr, ytr, xte, yte = split_digits(seed)
    dense = {t["task"]: t["merged_accuracy"] for t in summary["tasks"]}
    tasks = [t["task"] for t in summary["tasks"]]
    report = {"methods": {}}
    folder = os.path.join(out_dir, "compressed")
    os.makedirs(folder, exist_ok=True)
    for method, kwargs in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"})):
        tag = method.replace("%", "pct").replace(":", "-")
        pruned_path = os.path.join(folder, f"base-{tag}.safetensors")
        prune_files(summary["base_file"], pruned_path, targets=r"features\.\d+\.weight|head\.weight", **kwargs)
        base = DigitsNet()
        base.load_state_dict(load_file(pruned_path))
        base.eval()
        rows = [train_task(base, pruned_path, t, folder, (xtr, ytr, xte, yte), r=r, epochs=epochs, seed=seed,
                           suffix=f".{tag}") for t in tasks]
        # int8 per-task models (ONNX Runtime static quantization, QDQ) sharing the base's bytes on disk
        calib = np.concatenate([TASKS[t](xtr[:200]).numpy() for t in tasks]).astype(np.float32)
        int8_dir = os.path.join(folder, f"int8-{tag}")
        os.makedirs(int8_dir, exist_ok=True)
        export_task_models(base, torch.zeros(1, 1, 8, 8), int8_dir, [row["adapter_file"] for row in rows],
                           dynamic_batch=True, quantize="int8", calibration=calib)
        for row in rows:
            t = row["task"]
            x = TASKS[t](xte).numpy().astype(np.float32)
            row["dense_accuracy"] = dense[t]
            row["pruned_accuracy"] = row["merged_accuracy"]
            row["int8_accuracy"] = None
            path = os.path.join(int8_dir, f"{t}.onnx")
            if os.path.exists(path):
                sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
                row["int8_accuracy"] = float((logits.argmax(-1) == task_labels(t, yte).numpy()).mean())
            sp = row["merge_sparsity"]
            row["zeros_kept"] = sp["zeros_kept"] / max(sp["zeros_base"], 1)
            merged = load_file(row["merged_file"])
            weights = [v for k, v in merged.items() if k.endswith("weight") and v.dim() >= 2]
            row["merged_sparsity"] = float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
        n = len(rows)
        base_bytes = os.path.getsize(pruned_path)
        report["methods"][method] = {
            "tasks": rows,
            "bytes": {
                "n_merged_fp32": sum(os.path.getsize(row["merged_file"]) for row in rows),
                "base_plus_adapters": base_bytes + sum(row["adapter_bytes"] for row in rows),
                "int8_base_plus_int8_task_models": _folder_bytes(int8_dir),
                "int8_tasks": len(rows),
            },
        }
        log("")
        log(f"compressed track, base pruned {method} ({n} tasks; int8 = ONNX Runtime QDQ per-task models)")
        log(f"{'task':<10} {'dense':>7} {'pruned':>7} {'pruned+int8':>12} {'merged sparsity':>16} {'zeros kept':>11}")
        for row in rows:
            i8 = f"{row['int8_accuracy']:.1%}" if row["int8_accuracy"] is not None else "n/a"
            log(f"{row['task']:<10} {row['dense_accuracy']:>7.1%} {row['pruned_accuracy']:>7.1%} {i8:>12} "
                f"{row['merged_sparsity']:>16.1%} {row['zeros_kept']:>11.1%}")
        b = report["methods"][method]["bytes"]
        log(f"bytes on disk for {n} tasks: {n} merged fp32 models {b['n_merged_fp32']:,}; one base + {n} adapters "
            f"{b['base_plus_adapters']:,}; one int8 base + {b['int8_tasks']} int8 task models "
            f"{b['int8_base_plus_int8_task_models']:,}")
    return report
