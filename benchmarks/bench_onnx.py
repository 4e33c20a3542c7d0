"""ONNX Runtime latency: merged export vs torch eager, bank graph (adapter active) vs merged.

A transformers ResNet-18-like config (random weights), every conv and the classifier adapted
(r=16), batch 1 and 8, 64x64 and 224x224 inputs, 2 threads for both torch and ORT. Medians of
--reps timed calls after warm-up; ratios from this one run. Also the wall time of each export.

    python benchmarks/bench_onnx.py [--reps 20] [--json benchmarks/results/onnx_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _timing import median_time  # noqa: E402


def _resnet18():
    from transformers import ResNetConfig, ResNetForImageClassification

    from tests.exporters.arch import _Logits

    cfg = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                       layer_type="basic", num_labels=10)
    return _Logits(ResNetForImageClassification(cfg), "logits").eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/onnx_cpu.json")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch

    from liedeploy.exporters.bank_graph import BankSession, export_bank_graph
    from liedeploy.exporters.onnx import export_onnx
    from liedeploy import LieConfig, apply_adapters_, load_adapter, merge_, save_adapter
    from liedeploy.core.adapt import iter_adapters

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = _resnet18()
    adapted = apply_adapters_(copy.deepcopy(base), LieConfig(r=16, alpha=16, targets=r".*(convolution|classifier\.1)\.weight"))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(adapted):
            lie.lie_B.normal_(0, 0.01)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = os.path.join(tmp, "task.safetensors")
        save_adapter(adapted, adapter, name="task")
        merged = merge_(load_adapter(copy.deepcopy(base), adapter))
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        exports = {}
        for hw in (64, 224):
            d = os.path.join(tmp, str(hw))
            os.makedirs(d)
            t = time.perf_counter()
            export_onnx(merged, torch.randn(1, 3, hw, hw), os.path.join(d, "merged.onnx"), dynamic_batch=True)
            t_export = time.perf_counter() - t
            t = time.perf_counter()
            export_bank_graph(base, torch.randn(1, 3, hw, hw), os.path.join(d, "bank.onnx"), [adapter], dynamic_batch=True)
            exports[hw] = {"merged_s": t_export, "bank_s": time.perf_counter() - t}
            sess = ort.InferenceSession(os.path.join(d, "merged.onnx"), so, providers=["CPUExecutionProvider"])
            bank = BankSession(os.path.join(d, "bank.onnx"), so)
            ro = bank.run_options(os.path.join(d, "task.onnx_adapter"))
            name = sess.get_inputs()[0].name
            for batch in (1, 8):
                x = torch.randn(batch, 3, hw, hw)
                xn = x.numpy()
                with torch.no_grad():
                    t_torch = median_time(lambda: merged(x), args.reps, warmup=3)[0]
                t_ort = median_time(lambda: sess.run(None, {name: xn}), args.reps, warmup=3)[0]
                t_bank = median_time(lambda: bank.session.run(None, {bank.input_name: xn}, run_options=ro), args.reps, warmup=3)[0]
                key = f"{hw}x{hw} b{batch}"
                results[key] = {"torch_eager_s": t_torch, "ort_merged_s": t_ort, "ort_bank_s": t_bank}
                rows.append((key, t_torch, t_ort, t_bank))
    print(f"ResNet-18-like config, r=16 on every conv + classifier, {args.threads} threads, median of {args.reps}")
    print(f"{'input':<12} {'torch ms':>9} {'ORT merged ms':>14} {'bank ms':>9} {'merged/torch':>13} {'bank/merged':>12}")
    for key, tt, to, tb in rows:
        print(f"{key:<12} {tt * 1e3:>9.2f} {to * 1e3:>14.2f} {tb * 1e3:>9.2f} {to / tt:>13.2f} {tb / to:>12.2f}")
    for hw, e in exports.items():
        print(f"export wall time at {hw}x{hw}: merged {e['merged_s']:.1f} s, bank graph + adapter {e['bank_s']:.1f} s")
    print("targets: ORT merged <= 0.8x torch eager; bank graph < 1.5x merged (or a measured explanation)")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "exports": exports}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
