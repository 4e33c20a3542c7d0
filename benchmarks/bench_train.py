"""Training step time and peak memory: Lie exact vs Lie first_order vs PEFT LoRA vs PEFT HiRA.

A transformers ConvNeXt-tiny config (random weights), 64x64 inputs, batch 16, CPU; the same targets
(every pointwise Linear: pwconv1, pwconv2) and rank r=16 for all four. Each method runs in its own
subprocess so that peak memory (RSS high-water mark during the steps, minus RSS once the model is built;
glibc told to return freed blocks, MALLOC_MMAP_THRESHOLD_=65536) is its own; on CUDA,
max_memory_allocated minus the model. Time: median of the measured steps. Ratios are within this one run.

    python benchmarks/bench_train.py [--steps 8] [--threads 2] [--json benchmarks/results/train_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ["lie_exact", "lie_first_order", "peft_lora", "peft_hira"]
TARGETS = ["pwconv1", "pwconv2"]


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


VIT_TARGETS = r"vit\.layers\.\d+\.(attention\.(q|k|v|o)_proj|mlp\.fc(1|2))"


def _targets(size: str):
    return VIT_TARGETS if size == "vit-b" else TARGETS


def _build(method: str, r: int, size: str):
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if size == "vit-b":
        model = ViTForImageClassification(ViTConfig(num_labels=10, image_size=64))
    elif size == "tiny":
        cfg = ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], num_labels=10, image_size=64)
    else:  # base
        cfg = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024], num_labels=10, image_size=64)
    if size != "vit-b":
        model = ConvNextForImageClassification(cfg)
    targets = _targets(size)
    if method.startswith("lie"):
        from liedeploy import LieConfig, apply_adapters_

        lie_targets = targets + r"\.weight" if isinstance(targets, str) else targets
        apply_adapters_(model, LieConfig(r=r, alpha=r, expmap=method[4:], targets=lie_targets))
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    else:
        from peft import HiraConfig, LoraConfig, get_peft_model

        if method == "peft_lora":
            pc = LoraConfig(r=r, lora_alpha=r, target_modules=targets, modules_to_save=["classifier"])
        else:
            pc = HiraConfig(r=r, target_modules=targets, modules_to_save=["classifier"])
        model = get_peft_model(model, pc)
    return model


def worker(method: str, steps: int, warmup: int, r: int, batch: int, size: str, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    model = _build(method, r, size).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 64, 64, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def step():
        with amp:
            out = model(pixel_values=x).logits
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    rss0 = _rss_kb()
    step()  # optimizer state (the same size for every method: equal trainable counts)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    return {
        "method": method,
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "peak_bytes": peak,
        "trainable": sum(p.numel() for p in params),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", choices=["tiny", "base", "vit-b"], default="tiny", help="ConvNeXt tiny/base or ViT-B")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="benchmarks/results/train_cpu.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        res = worker(args.worker, args.steps, args.warmup, args.rank, args.batch, args.size, args.device)
        print("RESULT " + json.dumps(res))
        return 0
    results = {}
    for m in METHODS:
        cmd = [sys.executable, __file__, "--worker", m, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--rank", str(args.rank), "--batch", str(args.batch),
               "--size", args.size, "--device", args.device]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{m}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[m] = json.loads(line[0][7:])
    fo, hira, lora = results["lie_first_order"], results["peft_hira"], results["peft_lora"]
    print(f"{args.size} config, {args.batch}x3x64x64, r={args.rank}, targets {_targets(args.size)}, "
          f"device {args.device}, {args.threads} threads, median of {args.steps} steps")
    print(f"{'method':<16} {'trainable':>10} {'step (s)':>9} {'peak MB':>8} {'time/first_order':>17} "
          f"{'mem/first_order':>16} {'time/HiRA':>10} {'time/LoRA':>10}")
    for m, r in results.items():
        print(f"{m:<16} {r['trainable']:>10,} {r['median_step_s']:>9.3f} {r['peak_bytes'] / 2**20:>8.1f} "
              f"{r['median_step_s'] / fo['median_step_s']:>17.3f} {r['peak_bytes'] / max(fo['peak_bytes'], 1):>16.3f} "
              f"{r['median_step_s'] / hira['median_step_s']:>10.3f} {r['median_step_s'] / lora['median_step_s']:>10.3f}")
    ex = results["lie_exact"]
    summary = {
        "exact_over_first_order_time": ex["median_step_s"] / fo["median_step_s"],
        "exact_over_first_order_memory": ex["peak_bytes"] / max(fo["peak_bytes"], 1),
        "first_order_over_hira_time": fo["median_step_s"] / hira["median_step_s"],
        "first_order_over_hira_memory": fo["peak_bytes"] / max(hira["peak_bytes"], 1),
    }
    print("targets: exact <= 1.10x first_order (time, memory); first_order <= 1.15x HiRA")
    print(json.dumps(summary, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
