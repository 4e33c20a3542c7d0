"""How much a weight-stripped TensorRT plan (``--strip``) leaves out, from the ONNX weights (CPU only).

    python benchmarks/bench_strip.py

For a ResNet-18-like config (r=16 adapters on every conv and the classifier) and a ViT-B-like config
(adapters on the attention and MLP Linears): the bytes of the refittable weights (stripped from the
plan) over all weights, and the same when every weight is marked refittable (the plan without
weights). No TensorRT is needed: the engine's weights are the ONNX initializers. Writes
benchmarks/results/strip_cpu.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _vit_b():
    from transformers import ViTConfig, ViTForImageClassification

    from tests.exporters.arch import _Logits

    cfg = ViTConfig(image_size=64, patch_size=16, num_labels=10)  # ViT-B widths and depth
    return _Logits(ViTForImageClassification(cfg), "logits").eval()


def main() -> int:
    import torch

    from benchmarks.serve_models import resnet18
    from liedeploy.exporters.tensorrt import export_refit_onnx, strip_size_report
    from tests.conftest import _write_adapter

    rows = {}
    for name, fn, targets, shape in (
        ("resnet18-like 64x64", resnet18, r".*(convolution|classifier\.1)\.weight", (1, 3, 64, 64)),
        ("vit-b-like 64x64", _vit_b, r".*(q_proj|k_proj|v_proj|o_proj|query|key|value|dense|fc1|fc2)\.weight",
         (1, 3, 64, 64)),
    ):
        torch.manual_seed(0)
        model = fn()
        with tempfile.TemporaryDirectory() as d:
            a = _write_adapter(model, os.path.join(d, "a.safetensors"), targets, r=16, alpha=16)
            path = os.path.join(d, "m.onnx")
            export_refit_onnx(model, torch.zeros(shape), path, refit_adapters=[a])
            rep = strip_size_report(path, json.load(open(path + ".refit.json")))
        rows[name] = rep
        print(f"{name:22s} weights {rep['weights_bytes'] / 1e6:7.1f} MB; stripped plan keeps {rep['kept_ratio']:.3f}x of them "
              f"(adapted weights refittable); {rep['all_refittable_kept_ratio']:.4f}x with every weight refittable", flush=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "strip_cpu.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
