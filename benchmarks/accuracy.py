"""Accuracy study: Lie exact vs Lie first_order vs PEFT LoRA (conv) vs PEFT HiRA, small scale.

scikit-learn's bundled 8x8 digits (no download). A small convnet (four plain 3x3 convs, so every
method applies) is pretrained on upright digits; then, for each shifted task (rotated, inverted,
mirrored, blurred), only its conv layers are adapted with each method at the same rank, hence the
same trainable-parameter count (checked), with the same optimiser, epochs and data order.
3 seeds; mean and std of test accuracy per task. Ratios and numbers come from this one run.

    python benchmarks/accuracy.py [--seeds 3] [--epochs 20] [--rank 4] [--json benchmarks/results/accuracy.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ["lie_exact", "lie_first_order", "peft_lora", "peft_hira"]
CONVS = ["features.0", "features.2", "features.4", "features.6"]


class ConvNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _adapt(base: nn.Module, method: str, r: int) -> nn.Module:
    model = copy.deepcopy(base)
    if method.startswith("lie"):
        from liedeploy import LieConfig, apply_adapters_

        return apply_adapters_(model, LieConfig(r=r, alpha=2 * r, expmap=method[4:], targets=CONVS))
    from peft import HiraConfig, LoraConfig, get_peft_model

    if method == "peft_lora":
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=CONVS)
    else:
        cfg = HiraConfig(r=r, target_modules=CONVS)
    return get_peft_model(model, cfg)


def _train(model, x, y, epochs, lr, seed):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            j = perm[i : i + 64]
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return sum(p.numel() for p in params)


@torch.no_grad()
def _acc(model, x, y):
    return float((model(x).argmax(-1) == y).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/accuracy.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from liedeploy.demo.pipeline import TASKS, load_digits_tensors

    t0 = time.perf_counter()
    x, y = load_digits_tensors()
    results: dict = {t: {m: [] for m in METHODS} for t in TASKS}
    params: dict = {}
    base_acc: dict = {t: [] for t in TASKS}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + seed))
        xs, ys = x[perm], y[perm]
        n_test = len(xs) // 4
        xtr, ytr, xte, yte = xs[n_test:], ys[n_test:], xs[:n_test], ys[:n_test]
        base = ConvNet()
        for p in base.parameters():
            p.requires_grad_(True)
        _train(base, xtr, ytr, 30, 3e-3, seed)
        for task, tf in TASKS.items():
            base_acc[task].append(_acc(base, tf(xte), yte))
            for method in METHODS:
                torch.manual_seed(1000 + seed)  # the same factor init stream for every method
                model = _adapt(base, method, args.rank)
                n = _train(model, tf(xtr), ytr, args.epochs, args.lr, seed)
                params.setdefault(method, n)
                if params[method] != n:
                    raise RuntimeError(f"{method}: trainable count changed ({params[method]} vs {n})")
                results[task][method].append(_acc(model, tf(xte), yte))
    counts = set(params.values())
    print(f"digits 8x8, ConvNet ({sum(p.numel() for p in ConvNet().parameters()):,} params), conv layers adapted, "
          f"r={args.rank}, {args.epochs} epochs, AdamW lr={args.lr}, {args.seeds} seeds; mean ± std test accuracy")
    print("trainable parameters: " + ", ".join(f"{m} {n:,}" for m, n in params.items())
          + (" (equal)" if len(counts) == 1 else " (NOT equal)"))
    header = f"{'task':<10} {'base':>7} " + " ".join(f"{m:>17}" for m in METHODS)
    print(header)
    summary = {}
    for task in TASKS:
        cells = []
        summary[task] = {"base": statistics.mean(base_acc[task])}
        for m in METHODS:
            v = results[task][m]
            mu, sd = statistics.mean(v), statistics.pstdev(v)
            summary[task][m] = {"mean": mu, "std": sd, "runs": v}
            cells.append(f"{mu * 100:>9.1f} ± {sd * 100:>4.1f}")
        print(f"{task:<10} {summary[task]['base'] * 100:>7.1f} " + " ".join(f"{c:>17}" for c in cells))
    means = {m: statistics.mean(summary[t][m]["mean"] for t in TASKS) for m in METHODS}
    print(f"{'average':<10} {'':>7} " + " ".join(f"{means[m] * 100:>17.1f}" for m in METHODS))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "trainable": params, "results": summary, "average": means}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
