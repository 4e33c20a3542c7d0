"""The GPU check: one command on a machine with one GPU (and TensorRT where installed), under 8
minutes, writing benchmarks/results/gpu_check.json:

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out benchmarks/results

1. ``pytest -m gpu`` (tests/test_gpu.py);
2. bench_train.py on CUDA with bf16 autocast (Lie exact vs first_order vs PEFT LoRA vs HiRA: step
   time and peak memory) for a ConvNeXt-base-like and a ViT-B-like config;
3. benchmarks/gpu_extra.py, each part independent (its docstring lists them): the bank's cold switch,
   2:4 semi-structured sparse vs dense, and every TensorRT path the README describes (strongly typed
   fp32/fp16 builds of a ResNet-like and a ViT-like config with A->B->A refits against torch, a
   stripped plan, a fixed-batch engine refused, the missing-weights completion, serve --backend trt
   with 3 tasks over HTTP, and timing ratios).

Where CUDA or TensorRT is missing, each part prints one line saying it was skipped, and the script
exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    import torch

    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cuda = torch.cuda.is_available()
    summary = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "none (GPU parts skipped)",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", os.path.join(ROOT, "tests", "test_gpu.py"),
                            "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True)
    last = [l for l in tests.stdout.splitlines() if l.strip()][-1:] or ["(no output)"]
    summary["gpu_tests"] = {"returncode": tests.returncode, "summary": last[0]}
    print(f"GPU tests: {last[0]}")
    if tests.returncode not in (0,):
        print(tests.stdout[-4000:], tests.stderr[-2000:])
    summary["train"] = {}
    if cuda:
        for size in ("base", "vit-b"):
            out = os.path.join(args.out, f"gpu_train_{size}.json")
            cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--device", "cuda", "--size", size,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--json", out]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            print(proc.stdout)
            if proc.returncode:
                print(proc.stderr[-3000:])
                summary["train"][size] = {"error": proc.stderr[-500:]}
                continue
            with open(out) as f:
                summary["train"][size] = json.load(f)["summary"]
    else:
        print("no CUDA device: the training benchmark on GPU is skipped")
    sys.path.insert(0, ROOT)
    from benchmarks.gpu_extra import run_all

    summary["extra"] = run_all(args.out)  # cold switch, 2:4 sparse, TensorRT (each skipped with its reason)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0 if tests.returncode in (0, 5) else 1


if __name__ == "__main__":
    sys.exit(main())
