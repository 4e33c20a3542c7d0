"""Compression: pruned bases whose zeros Lie merges keep, against the additive alternative (PEFT LoRA).

    python benchmarks/bench_compress.py [--epochs 15]

On CPU with 2 threads, for 50% unstructured and 2:4 bases:
1. zeros kept after merging one task: Lie exact vs Lie first_order vs PEFT LoRA merge_and_unload,
   on the demo network and a ResNet-18-like config (target: Lie keeps 100%);
2. accuracy on the demo tasks: Lie trained on the pruned base vs LoRA trained on the pruned base
   and re-pruned after merging (what a LoRA user must do to keep the sparsity) vs dense (Lie on the
   dense base); same targets and rank for both methods;
3. ORT int8 (static, QDQ, per-channel) vs ORT fp32: latency at batch 1 and 8 and file size;
4. ``liedeploy prune`` wall time vs ``liedeploy merge`` on the same file.
Prints the tables and writes benchmarks/results/compress_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _timing import median_time  # noqa: E402


def _prune_model(model, method):
    """Magnitude-prune every rank >= 2 weight of ``model`` in place (the same rule as liedeploy prune)."""
    import torch

    from liedeploy.files.sparsity import magnitude_mask, nm_applicable, nm_mask

    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() < 2:
                continue
            v = p.detach().float().numpy()
            if method == "2:4":
                if not nm_applicable(v.shape, 4):
                    continue
                keep = nm_mask(v, 2, 4)
            else:
                keep = magnitude_mask(v, 0.5)
            p.mul_(torch.from_numpy(keep).to(p.dtype))
    return model


def _zeros(model):
    return {n: (p == 0) for n, p in model.named_parameters() if p.dim() >= 2}


def _kept(before, model):
    z0 = sum(int(m.sum()) for m in before.values())
    after = {n: (p == 0) for n, p in model.named_parameters() if n in before}
    return sum(int((before[n] & after[n]).sum()) for n in before) / max(z0, 1)


def zeros_kept(model_fn, targets_lie, targets_lora, method, seed=0) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from liedeploy import LieConfig, apply_adapters_, merge_
    from liedeploy.core.adapt import iter_adapters

    out = {}
    torch.manual_seed(seed)
    base = _prune_model(model_fn(), method)
    before = _zeros(base)
    for expmap in ("exact", "first_order"):
        m = apply_adapters_(copy.deepcopy(base), LieConfig(r=4, expmap=expmap, targets=targets_lie))
        with torch.no_grad():
            for _, _, _, lie in iter_adapters(m):
                lie.lie_B.normal_(0, 0.1)
        merge_(m)
        out[f"lie_{expmap}"] = _kept(before, m)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules=targets_lora))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    merged = pm.merge_and_unload()
    out["peft_lora"] = _kept({k: v for k, v in before.items() if any(t in k for t in targets_lora)},
                             merged) if targets_lora else None
    return out


def demo_accuracy(epochs: int, method: str) -> dict:
    """Per demo task: Lie on the pruned base vs LoRA on the pruned base, re-pruned after merging, vs dense."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from liedeploy import LieConfig, apply_adapters_, merge_
    from liedeploy.demo.pipeline import TASKS, DigitsNet, _batches, _pretrain, split_digits
    from liedeploy.train import evaluate, train_adapters

    xtr, ytr, xte, yte = split_digits(0)
    torch.manual_seed(0)
    base = DigitsNet()
    _pretrain(base, xtr, ytr, 30, 0, False)
    pruned = _prune_model(copy.deepcopy(base), method)
    targets = ["features.0", "features.4", "head"]  # non-grouped layers: PEFT LoRA refuses grouped convs
    rows = {}
    for task in ("rotated", "inverted", "mirrored", "blurred"):
        tr, te = TASKS[task](xtr), TASKS[task](xte)
        res = {}
        for label, b in (("dense_lie", base), ("pruned_lie", pruned)):
            m = apply_adapters_(copy.deepcopy(b), LieConfig(r=4, alpha=8, targets=targets))
            train_adapters(m, _batches(tr, ytr, 64, True, 0), epochs=epochs, lr=1e-2, device="cpu", progress=False)
            merge_(m)
            res[label] = evaluate(m, _batches(te, yte, 256, False), "cpu")
        pm = get_peft_model(copy.deepcopy(pruned), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        pm.train()
        for _ in range(epochs):
            for xb, yb in _batches(tr, ytr, 64, True, 0):
                loss = F.cross_entropy(pm(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        merged = pm.merge_and_unload().eval()
        res["pruned_lora_merged_unpruned"] = evaluate(merged, _batches(te, yte, 256, False), "cpu")
        res["pruned_lora_repruned"] = evaluate(_prune_model(merged, method), _batches(te, yte, 256, False), "cpu")
        rows[task] = res
        print(f"  {method} {task:<9} " + "  ".join(f"{k} {v:.1%}" for k, v in res.items()), flush=True)
    return rows


def ort_int8(tmp: str) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from benchmarks.serve_models import resnet18
    from liedeploy.exporters.onnx import export_onnx

    out = {}
    torch.manual_seed(0)
    for name, fn, shape in (("resnet18_64", resnet18, (1, 3, 64, 64)),):
        model = fn().eval()
        fp32 = os.path.join(tmp, f"{name}.onnx")
        int8 = os.path.join(tmp, f"{name}.int8.onnx")
        calib = np.random.default_rng(0).standard_normal((32,) + shape[1:]).astype(np.float32)
        export_onnx(model, torch.zeros(shape), fp32, dynamic_batch=True)
        rep = export_onnx(model, torch.zeros(shape), int8, dynamic_batch=True, quantize="int8", calibration=calib)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        row = {"fp32_bytes": os.path.getsize(fp32), "int8_bytes": os.path.getsize(int8)}
        row["int8_vs_fp32_size"] = row["int8_bytes"] / row["fp32_bytes"]
        row["int8_check"] = rep["int8"]["checks"][0]
        for b in (1, 8):
            x = np.random.default_rng(1).standard_normal((b,) + shape[1:]).astype(np.float32)
            sf = ort.InferenceSession(fp32, so, providers=["CPUExecutionProvider"])
            si = ort.InferenceSession(int8, so, providers=["CPUExecutionProvider"])
            tf = median_time(lambda: sf.run(None, {sf.get_inputs()[0].name: x}), 20, warmup=3)[0]
            ti = median_time(lambda: si.run(None, {si.get_inputs()[0].name: x}), 20, warmup=3)[0]
            row[f"batch{b}_int8_vs_fp32_latency"] = ti / tf
        out[name] = row
    return out


def prune_vs_merge(tmp: str) -> dict:
    import torch
    from safetensors.torch import save_file

    from benchmarks.serve_models import resnet18
    from tests.conftest import _write_adapter

    torch.manual_seed(0)
    m = resnet18()
    base = os.path.join(tmp, "r18.safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, base)
    a = _write_adapter(m, os.path.join(tmp, "a.safetensors"), r".*(convolution|classifier\.1)\.weight", r=16, alpha=16)
    env = dict(os.environ, PYTHONPATH=ROOT)

    def run(argv):
        def fn():
            subprocess.run([sys.executable, "-m", "liedeploy.cli", *argv], check=True, env=env, capture_output=True)
        return median_time(fn, 5, warmup=1)[0]

    t_prune = run(["prune", base, "-o", os.path.join(tmp, "p.safetensors"), "--sparsity", "0.5"])
    t_prune24 = run(["prune", base, "-o", os.path.join(tmp, "p24.safetensors"), "--pattern", "2:4"])
    t_merge = run(["merge", base, a, "-o", os.path.join(tmp, "m.safetensors")])
    return {"prune_50_s": t_prune, "prune_2_4_s": t_prune24, "merge_s": t_merge,
            "prune_vs_merge": t_prune / t_merge, "prune_2_4_vs_merge": t_prune24 / t_merge}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "compress_cpu.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from benchmarks.serve_models import resnet18
    from liedeploy.demo.pipeline import DigitsNet

    res = {"zeros_kept": {}, "accuracy": {}}
    for method in ("50%", "2:4"):
        res["zeros_kept"][f"demo net, {method}"] = zeros_kept(
            DigitsNet, r"(features\.\d+|head)\.weight", ["features.0", "features.4", "head"], method)
        res["zeros_kept"][f"resnet18-like, {method}"] = zeros_kept(
            resnet18, r".*(convolution|classifier\.1)\.weight", ["convolution"], method)
    print("zeros of the pruned base kept after merging one task (fraction)")
    print(f"{'base':<24} {'Lie exact':>10} {'Lie first_order':>16} {'PEFT LoRA':>10}")
    for k, v in res["zeros_kept"].items():
        print(f"{k:<24} {v['lie_exact']:>10.1%} {v['lie_first_order']:>16.1%} {v['peft_lora']:>10.1%}")
    for method in ("50%", "2:4"):
        res["accuracy"][method] = demo_accuracy(args.epochs, method)
    with tempfile.TemporaryDirectory() as tmp:
        res["int8"] = ort_int8(tmp)
        res["prune_vs_merge"] = prune_vs_merge(tmp)
    print("\naccuracy on the demo tasks (Lie on the pruned base vs LoRA on the pruned base re-pruned after merging)")
    for method, rows in res["accuracy"].items():
        for task, r in rows.items():
            print(f"  {method:<4} {task:<9} dense {r['dense_lie']:.1%}  Lie pruned {r['pruned_lie']:.1%}  "
                  f"LoRA pruned+re-pruned {r['pruned_lora_repruned']:.1%} (unpruned merge {r['pruned_lora_merged_unpruned']:.1%})")
    for name, r in res["int8"].items():
        print(f"\nORT int8 vs fp32 ({name}): size {r['int8_vs_fp32_size']:.2f}x, latency batch 1 "
              f"{r['batch1_int8_vs_fp32_latency']:.2f}x, batch 8 {r['batch8_int8_vs_fp32_latency']:.2f}x, "
              f"top-1 agreement {r['int8_check'].get('top1_agreement', float('nan')):.1%}")
    p = res["prune_vs_merge"]
    print(f"liedeploy prune vs liedeploy merge (same ResNet-18 file, wall incl. start-up): 50% {p['prune_vs_merge']:.2f}x, "
          f"2:4 {p['prune_2_4_vs_merge']:.2f}x")
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
