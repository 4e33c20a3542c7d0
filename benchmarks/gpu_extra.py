"""GPU parts of gpu_check.py beyond the tests and training: the bank's cold switch on CUDA, TensorRT
(build, refit A->B->A against torch, refit vs build time, latency vs torch eager and ORT CUDA),
serving through --backend trt, and 2:4 semi-structured sparse tensors. Each part is skipped, with
the reason recorded, where its stack (CUDA, TensorRT, onnxruntime-gpu) is missing.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cuda_time(fn, reps=20, warmup=3):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cold_switch() -> dict:
    """Fold per batch on a GPU: the bank's cold switch vs one batch of inference (ResNet-18-like, 64x64)."""
    import torch

    from benchmarks.serve_models import resnet18
    from liedeploy import AdapterBank
    from tests.conftest import _write_adapter

    torch.manual_seed(0)
    base = resnet18().cuda().eval()
    with tempfile.TemporaryDirectory() as d:
        paths = [_write_adapter(base.cpu(), os.path.join(d, f"a{i}.safetensors"), r".*(convolution|classifier\.1)\.weight",
                                r=16, alpha=16, std=0.02, seed=i) for i in range(2)]
        bank = AdapterBank(base.cuda(), adapters={"a": paths[0], "b": paths[1]}, cache_bytes=1)  # every call folds
        x = torch.randn(16, 3, 64, 64, device="cuda")
        with torch.no_grad():
            infer = _cuda_time(lambda: bank(x))
            k = {"i": 0}

            def cold():
                k["i"] ^= 1
                bank(x, task="ab"[k["i"]])

            both = _cuda_time(cold)
    return {"batch16_infer_ms": infer * 1e3, "cold_switch_plus_batch_ms": both * 1e3, "fold_vs_batch": (both - infer) / infer}


def semi_structured() -> dict:
    """A merged 2:4 task's Linear through torch's semi-structured sparse tensors vs dense."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    W = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    mask = torch.zeros_like(W, dtype=torch.bool).view(4096, -1, 4)
    idx = W.abs().view(4096, -1, 4).topk(2, -1).indices
    mask.scatter_(-1, idx, True)
    W = W * mask.view(4096, 4096)  # a 2:4 base
    W = W * torch.exp(0.01 * torch.randn_like(W))  # a Lie task keeps every zero
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    dense = _cuda_time(lambda: torch.mm(W, x))
    Ws = to_sparse_semi_structured(W)
    sparse = _cuda_time(lambda: torch.mm(Ws, x))
    err = float((torch.mm(Ws, x) - torch.mm(W, x)).abs().max())
    return {"dense_ms": dense * 1e3, "sparse_ms": sparse * 1e3, "sparse_vs_dense": sparse / dense, "max_abs_diff": err}


def tensorrt_part(out_dir: str) -> dict:
    """Build, refit A->B->A (fp32, fp16) against torch, refit vs build time, latency vs torch and ORT CUDA."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import tensorrt  # noqa: F401  (skips this part where TensorRT is missing)
    from benchmarks.serve_models import resnet18
    from liedeploy.exporters.tensorrt import TrtTaskSwitcher, export_tensorrt
    from liedeploy.serving.backends.trt import TrtRunner
    from liedeploy import load_adapter, merge_
    from tests.conftest import _write_adapter

    res = {}
    torch.manual_seed(0)
    base = resnet18().eval()
    with tempfile.TemporaryDirectory() as d:
        bpath = os.path.join(d, "base.safetensors")
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, bpath)
        ads = [_write_adapter(base, os.path.join(d, f"a{i}.safetensors"), r".*(convolution|classifier\.1)\.weight",
                              r=16, alpha=16, std=0.02, seed=i) for i in range(2)]
        x = torch.randn(8, 3, 64, 64)
        for fp16 in (False, True):
            tag = "fp16" if fp16 else "fp32"
            eng = os.path.join(d, f"m_{tag}.engine")
            t = time.perf_counter()
            export_tensorrt(base, x, eng, dynamic_batch=True, fp16=fp16, refit_adapters=ads)
            build = time.perf_counter() - t
            sw = TrtTaskSwitcher(eng, bpath)
            run = TrtRunner(sw.engine, sw.stream)
            name = run.inputs[0]
            errs, refit_times = [], []
            for a in (ads[0], ads[1], ads[0]):
                t = time.perf_counter()
                sw.activate(a)
                refit_times.append(time.perf_counter() - t)
                got = list(run({name: x.numpy()}).values())[0]
                with torch.no_grad():
                    want = merge_(load_adapter(copy.deepcopy(base), a))(x).numpy()
                errs.append(float(np.abs(got - want).max()))
            tol = 5e-2 if fp16 else 1e-3
            res[tag] = {"build_s": build, "refit_s": statistics.median(refit_times),
                        "refit_vs_build": statistics.median(refit_times) / build, "max_abs_vs_torch": errs,
                        "a_b_a_ok": all(e <= tol for e in errs)}
            xc = x.cuda()
            trt_t = _cuda_time(lambda: run({name: x.numpy()}))
            m = base.cuda()
            with torch.no_grad():
                eager = _cuda_time(lambda: m(xc))
            base.cpu()
            res[tag]["engine_vs_torch_eager"] = trt_t / eager
            try:
                import onnxruntime as ort

                if "CUDAExecutionProvider" in ort.get_available_providers():
                    sess = ort.InferenceSession(os.path.splitext(eng)[0] + ".onnx", providers=["CUDAExecutionProvider"])
                    feed = {sess.get_inputs()[0].name: x.numpy()}
                    res[tag]["engine_vs_ort_cuda"] = trt_t / _cuda_time(lambda: sess.run(None, feed))
            except ImportError:
                res[tag]["engine_vs_ort_cuda"] = "onnxruntime-gpu not installed"
    return res


def run_all(out_dir: str) -> dict:
    import torch

    out = {}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    for name, fn in (("cold_switch", cold_switch), ("semi_structured_2_4", semi_structured),
                     ("tensorrt", lambda: tensorrt_part(out_dir))):
        try:
            out[name] = fn()
        except ImportError as exc:
            out[name] = {"skipped": f"{exc}"}
        except Exception as exc:  # noqa: BLE001 - recorded, the other parts still run
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(name, json.dumps(out[name], indent=1), flush=True)
    return out
