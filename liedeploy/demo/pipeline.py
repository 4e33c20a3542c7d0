"""The main job, end to end on embedded data (scikit-learn's bundled 8x8 digits, no download).

Pretrain a small convnet (grouped, strided, dilated depthwise convs), then for each task (rotated,
inverted, mirrored, blurred digits) train Lie adapters, save one adapter file per task, merge
it from files, serve all tasks from one AdapterBank in a mixed request stream, and compare
accuracies. The ONNX part (exporters.demo_onnx) is run by the CLI when onnxruntime is installed.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from liedeploy.core.adapt import apply_adapters_, trainable_parameter_count
from liedeploy.core.adapter_file import save_adapter
from liedeploy.bank.adapter_bank import AdapterBank
from liedeploy.core.config import LieConfig
from liedeploy.files.file_merge import merge_files
from liedeploy.errors import ConfigError, MissingDependencyError
from liedeploy.train import evaluate, train_adapters

__all__ = ["DigitsNet", "load_digits_tensors", "TASKS", "NEW_HEADS", "task_labels", "train_task", "split_digits", "run_demo"]


class DigitsNet(nn.Module):
    """A tiny convnet for 1x8x8 digits with a grouped, a strided and a dilated depthwise conv."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=4, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2, groups=2 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as (N, 1, 8, 8) float in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError(
            "liedeploy demo needs scikit-learn for its embedded digits data: pip install 'liedeploy[demo]'"
        ) from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3)) * 1.5


TASKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "rotated": lambda x: torch.rot90(x, 1, dims=(2, 3)),
    "inverted": lambda x: 1.0 - x,
    "mirrored": lambda x: torch.flip(x, dims=(3,)),
    "blurred": _blur,
    "parity": lambda x: x,  # a new task: upright digits, 2 classes (even/odd), a head of its own
}
# tasks with a head of their own: (classes, label map). Trained from scratch with the adapters
# (modules_to_save=["head"]), saved in adapter format "2".
NEW_HEADS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "parity": (2, lambda y: y % 2),
}


def task_labels(task: str, y: torch.Tensor) -> torch.Tensor:
    """The labels of ``task`` for digit labels ``y`` (digits, or e.g. parity for a new-head task)."""
    return NEW_HEADS[task][1](y) if task in NEW_HEADS else y


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int, shuffle: bool, seed: int = 0):
    class _Loader:
        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            if shuffle:
                g = torch.Generator().manual_seed(seed + self.epoch)
                idx = torch.randperm(len(x), generator=g)
                self.epoch += 1
            else:
                idx = torch.arange(len(x))
            for i in range(0, len(x), bs):
                j = idx[i : i + bs]
                yield x[j], y[j]

        def __len__(self):
            return (len(x) + bs - 1) // bs

    return _Loader()


def _pretrain(model: nn.Module, x, y, epochs: int, seed: int, progress) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loader = _batches(x, y, 64, True, seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def split_digits(seed: int = 0) -> tuple:
    """``(xtr, ytr, xte, yte)``: the demo's train/test split of the bundled digits (a quarter for test)."""
    x, y = load_digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 4
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def train_task(base: nn.Module, base_path: str, name: str, out_dir: str, data: tuple, *, r: int = 4,
               expmap: str = "exact", epochs: int = 25, seed: int = 0, progress=None, suffix: str = "") -> dict:
    """Train one demo task's adapter on ``base`` (a new head too, for NEW_HEADS tasks), save it, merge
    it from files into ``base_path`` and score every step; returns the task's result row."""
    xtr, ytr, xte, yte = data
    tf = TASKS[name]
    tr, te = tf(xtr), tf(xte)
    ytr_t, yte_t = task_labels(name, ytr), task_labels(name, yte)
    model = copy.deepcopy(base)
    config = LieConfig(r=r, alpha=2.0 * r, expmap=expmap, targets=r"(features\.\d+|head)\.weight")
    if name in NEW_HEADS:  # a new head: the base has none for this task; chance = the majority class
        before = float(torch.bincount(yte_t).max()) / len(yte_t)
        model.head = nn.Linear(model.head.in_features, NEW_HEADS[name][0])
        config = LieConfig(r=r, alpha=2.0 * r, expmap=expmap, targets=r"features\.\d+\.weight", modules_to_save=["head"])
    else:
        before = evaluate(model, _batches(te, yte_t, 256, False), "cpu")
    apply_adapters_(model, config)
    n_params = trainable_parameter_count(model)
    path = os.path.join(out_dir, f"{name}{suffix}.safetensors")
    train_adapters(model, _batches(tr, ytr_t, 64, True, seed), epochs=epochs, lr=1e-2, device="cpu",
                   progress=progress, desc=name)
    save_adapter(model, path, name=name)
    adapted = evaluate(model, _batches(te, yte_t, 256, False), "cpu")
    # merge from files (what deployments do) and check the merged model
    merged_path = os.path.join(out_dir, f"{name}{suffix}.merged.safetensors")
    summary = merge_files(base_path, [path], merged_path)
    merged_sd = load_file(merged_path)
    merged = DigitsNet(classes=int(merged_sd["head.weight"].shape[0]))
    merged.load_state_dict(merged_sd)
    merged_acc = evaluate(merged, _batches(te, yte_t, 256, False), "cpu")
    return {
        "task": name,
        "base_accuracy": before,
        "adapted_accuracy": adapted,
        "merged_accuracy": merged_acc,
        "adapter_file": path,
        "merged_file": merged_path,
        "adapter_bytes": os.path.getsize(path),
        "trainable_parameters": n_params,
        "classes": NEW_HEADS[name][0] if name in NEW_HEADS else 10,
        "new_head": name in NEW_HEADS,
        "merge_sparsity": summary["sparsity"],
    }


def run_demo(
    out_dir: str = "liedeploy-demo",
    *,
    tasks: Optional[list[str]] = None,
    pretrain_epochs: int = 30,
    adapter_epochs: int = 25,
    r: int = 4,
    expmap: str = "exact",
    seed: int = 0,
    progress: Optional[bool] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo; returns a JSON-able summary (also written to ``out_dir/summary.json``)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown demo task {unknown[0]!r}; known tasks: {', '.join(TASKS)}")
    os.makedirs(out_dir, exist_ok=True)
    xtr, ytr, xte, yte = split_digits(seed)

    base = DigitsNet()
    _pretrain(base, xtr, ytr, pretrain_epochs, seed, progress)
    base_acc = evaluate(base, _batches(xte, yte, 256, False), "cpu")
    log(f"base model: {base_acc:.1%} on upright digits ({len(xtr)} train / {len(xte)} test images)")
    base_path = os.path.join(out_dir, "base.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)

    config = LieConfig(r=r, alpha=2.0 * r, expmap=expmap, targets=r"(features\.\d+|head)\.weight")
    results = [train_task(base, base_path, name, out_dir, (xtr, ytr, xte, yte), r=r, expmap=expmap,
                          epochs=adapter_epochs, seed=seed, progress=progress) for name in tasks]
    # one bank, one mixed request stream over every task's test images (tasks with a head of their
    # own answer with another number of classes: they are scored by task, not in the mixed stream)
    bank = AdapterBank(copy.deepcopy(base), adapters={res["task"]: res["adapter_file"] for res in results})
    for res in results:
        if res["new_head"]:
            with torch.no_grad():
                pred = bank(TASKS[res["task"]](xte), task=res["task"]).argmax(-1)
            res["bank_accuracy"] = int((pred == task_labels(res["task"], yte)).sum()) / len(yte)
    mixed = [res for res in results if not res["new_head"]]
    xs = torch.cat([TASKS[res["task"]](xte) for res in mixed] or [xte[:0]])
    ys = torch.cat([yte for _ in mixed] or [yte[:0]])
    names = [res["task"] for res in mixed for _ in range(len(xte))]
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed)).tolist()
    correct: dict = {res["task"]: 0 for res in mixed}
    for i in range(0, len(order), 32):
        idx = order[i : i + 32]
        pred = bank.forward_mixed(xs[idx], [names[j] for j in idx]).argmax(-1)
        for j, p in zip(idx, pred.tolist()):
            correct[names[j]] += int(p == int(ys[j]))
    for res in mixed:
        res["bank_accuracy"] = correct[res["task"]] / len(xte)
    total_params = sum(p.numel() for p in base.parameters())
    log("")
    log(f"{'task':<10} {'base acc':>9} {'adapted':>9} {'merged':>9} {'bank':>9} {'adapter params':>15} {'file bytes':>11}")
    for rres in results:
        log(
            f"{rres['task']:<10} {rres['base_accuracy']:>9.1%} {rres['adapted_accuracy']:>9.1%} "
            f"{rres['merged_accuracy']:>9.1%} {rres['bank_accuracy']:>9.1%} {rres['trainable_parameters']:>15,} "
            f"{rres['adapter_bytes']:>11,}"
        )
    log("(merged: liedeploy merge of the adapter file into base.safetensors; bank: AdapterBank serving one "
        "shuffled mixed-task request stream in batches of 32)")
    for res in results:
        if res["new_head"]:
            log(f"({res['task']}: a new task with its own {res['classes']}-class head trained from scratch with the "
                "adapters (adapter format 2); its 'base acc' is the majority class)")
    log(f"(base model: {total_params:,} parameters; adapters: r={r}, expmap={expmap})")
    summary = {
        "base_accuracy_upright": base_acc,
        "base_file": base_path,
        "tasks": results,
        "config": config.to_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    import json

    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"adapter files and summary.json in {out_dir}/ ({summary['seconds']:.1f} s)")
    return summary
