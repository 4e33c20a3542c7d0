"""GPU parts of gpu_check.py beyond the tests and training, each independent (one failure is
recorded and the others still run; a part whose stack is missing prints one line saying so):

- ``cold_switch``: the bank's fold per batch on CUDA vs one batch of inference;
- ``semi_structured_2_4``: a merged 2:4 task's matmul through torch's semi-structured sparse tensors;
- ``fused_fold_cuda``, ``bank_1000_cuda``, ``generate_cuda``: serving speed and text generation on
  CUDA (benchmarks/gpu_serving.py);
- ``trt_builds``: strongly typed fp32 (TF32 cleared) and fp16 engines of a ResNet-18-like and a
  ViT-like config (the ViT's Linear weights are transposed by the exporter: REFIT_INDIVIDUAL must
  still find them), refitted A->B->A and compared with torch on the CPU in fp32 (tolerance 1e-3 of
  the output's range for fp32, 5e-2 for fp16); build and refit times;
- ``trt_strip``: a weight-stripped plan refitted at load from the base file, then task switches;
- ``trt_fixed_batch``: an engine built without --dynamic-batch: the server refuses it at start for
  --max-batch 2, and its runner refuses 2 rows;
- ``trt_missing_weights``: a task whose full tensors include a bias: the refit completes whatever
  TensorRT still asks for (counted) and the output equals torch's;
- ``trt_serve``: ``liedeploy serve --backend trt --trt-slots 2`` with 3 tasks over HTTP on loopback,
  answers checked against torch;
- ``trt_timings``: ratios in one run: refit vs build, a cold task switch (refit) vs a forward, the
  engine vs torch eager and vs ONNX Runtime CUDA, at batch 1 and 32.
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


class _Engines:
    """Engines built once per configuration and shared by the parts (a failed build fails only the
    parts that need it)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.cache: dict = {}
        self._setup = None

    def setup(self):
        """``(models, base files, adapter files)`` for the ResNet-like and ViT-like configs."""
        if self._setup is None:
            import torch

            from benchmarks.serve_models import resnet18
            from tests.conftest import _write_adapter, save_state_dict
            from tests.exporters.arch import ARCHS

            models, bases, ads = {}, {}, {}
            torch.manual_seed(0)
            models["resnet"] = resnet18().eval()
            models["vit"] = ARCHS["vit"][0]().eval()
            targets = {"resnet": r".*(convolution|classifier\.1)\.weight", "vit": ARCHS["vit"][1]}
            for k, m in models.items():
                bases[k] = save_state_dict(m, os.path.join(self.folder, f"{k}.safetensors"))
                ads[k] = [_write_adapter(m, os.path.join(self.folder, f"{k}_a{i}.safetensors"), targets[k], r=16,
                                         alpha=16, std=0.02, seed=i) for i in range(3)]
            self._setup = (models, bases, ads)
        return self._setup

    def example(self, arch: str, batch: int):
        import torch

        return torch.randn(batch, 3, 64, 64) if arch == "resnet" else torch.randn(batch, 3, 32, 32)

    def build(self, arch: str, *, fp16: bool = False, dynamic: bool = True, strip: bool = False, batch: int = 8):
        """The engine's path and build seconds. The ResNet fp32 dynamic engine (the one timed) is built
        at TensorRT's default optimization level; the others at level 1, to fit the 8-minute budget."""
        from liedeploy.exporters.tensorrt import export_tensorrt

        key = (arch, fp16, dynamic, strip, batch)
        level = None if key == ("resnet", False, True, False, 8) else 1
        if key not in self.cache:
            models, _, ads = self.setup()
            path = os.path.join(self.folder, "_".join(map(str, key)) + ".engine")
            t = time.perf_counter()
            export_tensorrt(models[arch], self.example(arch, batch), path, dynamic_batch=dynamic, fp16=fp16, strip=strip,
                            refit_adapters=ads[arch], tf32=False, max_batch=64 if dynamic else None,
                            optimization_level=level)
            self.cache[key] = (path, time.perf_counter() - t)
        return self.cache[key]


def _reference(model, adapter, x):
    import torch

    from liedeploy import load_adapter, merge_
    from liedeploy.core.outputs import flatten_outputs

    with torch.no_grad():
        m = merge_(load_adapter(copy.deepcopy(model), adapter)) if adapter else copy.deepcopy(model)
        return flatten_outputs(m.float().cpu()(x.float()))[0].numpy()


def _err(got, want) -> float:
    import numpy as np

    return float(np.abs(got - want).max() / max(1e-6, float(np.abs(want).max())))


def _needs_trt():
    import tensorrt  # noqa: F401  (ImportError: the part is skipped with this reason)
    import torch

    if not torch.cuda.is_available():
        raise ImportError("no CUDA device")


def trt_builds(eng: _Engines) -> dict:
    """Strongly typed fp32/fp16 builds of both configs, A->B->A refits against torch."""
    from liedeploy.exporters.tensorrt import TrtTaskSwitcher
    from liedeploy.serving.backends.trt import TrtRunner

    _needs_trt()
    models, bases, ads = eng.setup()
    res = {}
    for arch in ("resnet", "vit"):
        for fp16 in (False, True):
            tag = f"{arch}_{'fp16' if fp16 else 'fp32'}"
            path, build_s = eng.build(arch, fp16=fp16)
            sw = TrtTaskSwitcher(path, bases[arch])
            run = TrtRunner(sw.engine, sw.stream)
            x = eng.example(arch, 8)
            errs, refits = [], []
            for a in (ads[arch][0], ads[arch][1], ads[arch][0]):
                t = time.perf_counter()
                sw.activate(a)
                refits.append(time.perf_counter() - t)
                got = list(run({run.inputs[0]: x.numpy()}).values())[0]
                errs.append(_err(got, _reference(models[arch], a, x)))
            tol = 5e-2 if fp16 else 1e-3
            res[tag] = {"build_s": build_s, "refit_s": statistics.median(refits), "rel_err_a_b_a": errs,
                        "tolerance": tol, "ok": all(e <= tol for e in errs)}
    return res


def trt_strip(eng: _Engines) -> dict:
    """A stripped plan refitted at load from the base file, then task switches."""
    from liedeploy.exporters.tensorrt import TrtTaskSwitcher
    from liedeploy.serving.backends.trt import TrtRunner

    _needs_trt()
    models, bases, ads = eng.setup()
    path, _ = eng.build("resnet", strip=True)
    full, _ = eng.build("resnet")
    sw = TrtTaskSwitcher(path, bases["resnet"])  # refits every refittable weight at load
    run = TrtRunner(sw.engine, sw.stream)
    x = eng.example("resnet", 8)
    errs = []
    for a in (None, ads["resnet"][0], ads["resnet"][2]):
        sw.activate(a)
        errs.append(_err(list(run({run.inputs[0]: x.numpy()}).values())[0], _reference(models["resnet"], a, x)))
    return {"plan_bytes_vs_unstripped": os.path.getsize(path) / os.path.getsize(full), "rel_err": errs,
            "ok": all(e <= 1e-3 for e in errs)}


def trt_fixed_batch(eng: _Engines) -> dict:
    """A fixed-batch engine: refused by the server for --max-batch 2; its runner refuses 2 rows."""
    from liedeploy import ConfigError, LieError
    from liedeploy.exporters.tensorrt import TrtTaskSwitcher
    from liedeploy.serving.backends.trt import TrtBackend, TrtRunner
    from liedeploy.serving.specs import default_input

    _needs_trt()
    _, bases, _ = eng.setup()
    path, _ = eng.build("resnet", dynamic=False, batch=1)
    out = {}
    try:
        TrtBackend(path, bases["resnet"], [default_input((1, 3, 64, 64))], slots=1, max_batch=2)
        out["server_refused"] = False
    except ConfigError as exc:
        out["server_refused"], out["server_message"] = True, str(exc)
    sw = TrtTaskSwitcher(path, bases["resnet"])
    run = TrtRunner(sw.engine, sw.stream)
    try:
        run({run.inputs[0]: eng.example("resnet", 2).numpy()})
        out["runner_refused"] = False
    except LieError as exc:
        out["runner_refused"], out["runner_message"] = True, str(exc)
    out["ok"] = out["server_refused"] and out["runner_refused"]
    return out


def trt_missing_weights(eng: _Engines) -> dict:
    """A task whose full tensors include a bias: what TensorRT still asks for is supplied."""
    import torch

    from liedeploy.exporters.tensorrt import TrtTaskSwitcher, export_tensorrt
    from liedeploy.serving.backends.trt import TrtRunner
    from tests.conftest import _write_adapter

    _needs_trt()
    models, bases, _ = eng.setup()
    base = models["resnet"]
    head = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("classifier.1.bias"):
                p.add_(0.5)
    owner = next(n for n, _ in base.named_modules() if n.endswith("classifier.1"))
    task = _write_adapter(head, os.path.join(eng.folder, "head_task.safetensors"), r".*convolution\.weight", r=8,
                          alpha=8, std=0.02, seed=7, modules_to_save=[owner])
    path = os.path.join(eng.folder, "head.engine")
    export_tensorrt(base, eng.example("resnet", 8), path, dynamic_batch=True, refit_adapters=[task], tf32=False,
                    optimization_level=1)
    sw = TrtTaskSwitcher(path, bases["resnet"])
    run = TrtRunner(sw.engine, sw.stream)
    sw.activate(task)
    x = eng.example("resnet", 8)
    err = _err(list(run({run.inputs[0]: x.numpy()}).values())[0], _reference(base, task, x))
    return {"missing_supplied": sw.stats["missing_supplied"], "rel_err": err, "ok": err <= 1e-3}


def trt_serve(eng: _Engines) -> dict:
    """liedeploy serve --backend trt --trt-slots 2 with 3 tasks over HTTP, answers against torch."""
    import shutil
    import urllib.request

    import numpy as np

    from tests.serving.helpers import ServerProcess

    _needs_trt()
    models, bases, ads = eng.setup()
    path, _ = eng.build("resnet")
    folder = os.path.join(eng.folder, "serve")
    tasks = os.path.join(folder, "tasks")
    os.makedirs(tasks, exist_ok=True)
    shutil.copy(bases["resnet"], os.path.join(folder, "base.safetensors"))
    shutil.copy(path, os.path.join(folder, "base.engine"))
    shutil.copy(os.path.splitext(path)[0] + ".onnx.refit.json", os.path.join(folder, "base.onnx.refit.json"))
    for i, a in enumerate(ads["resnet"]):
        shutil.copy(a, os.path.join(tasks, f"t{i}.safetensors"))
    x = eng.example("resnet", 4)
    errs = {}
    args = ["--backend", "trt", "--trt-slots", "2", "--model", "benchmarks.serve_models:resnet18", "--weights",
            os.path.join(folder, "base.safetensors"), "--adapters", tasks, "--input-shape", "1,3,64,64",
            "--max-batch", "8"]
    with ServerProcess(args, timeout=240) as srv:
        for rounds in range(2):  # 3 tasks over 2 slots: refits on the way
            for i, a in enumerate(ads["resnet"]):
                body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                               "data": x.reshape(-1).tolist()}]}).encode()
                req = urllib.request.Request(f"{srv.url}/v2/models/t{i}/infer", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    out = json.loads(r.read())["outputs"][0]
                got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
                errs[f"t{i}_{rounds}"] = _err(got, _reference(models["resnet"], a, x))
    return {"rel_err": errs, "ok": all(e <= 1e-3 for e in errs.values())}


def trt_timings(eng: _Engines) -> dict:
    """Ratios in one run: refit vs build, cold switch vs forward, engine vs torch eager and ORT CUDA."""
    import torch

    from liedeploy.exporters.tensorrt import TrtTaskSwitcher
    from liedeploy.serving.backends.trt import TrtRunner

    _needs_trt()
    models, bases, ads = eng.setup()
    path, build_s = eng.build("resnet")
    sw = TrtTaskSwitcher(path, bases["resnet"])
    run = TrtRunner(sw.engine, sw.stream)
    k = {"i": 0}

    def switch():
        k["i"] = (k["i"] + 1) % 2
        sw.activate(ads["resnet"][k["i"]])

    refit = _cuda_time(switch, reps=6, warmup=1)
    res = {"refit_vs_build": refit / build_s}
    m = copy.deepcopy(models["resnet"]).cuda().eval()
    for batch in (1, 32):
        x = eng.example("resnet", batch)
        xc = x.cuda()
        feed = {run.inputs[0]: x.numpy()}
        engine_t = _cuda_time(lambda: run(feed))
        with torch.no_grad():
            eager = _cuda_time(lambda: m(xc))
        row = {"engine_ms": engine_t * 1e3, "engine_vs_torch_eager": engine_t / eager,
               "cold_switch_vs_forward": refit / engine_t}
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                sess = ort.InferenceSession(os.path.splitext(path)[0] + ".onnx", providers=["CUDAExecutionProvider"])
                f = {sess.get_inputs()[0].name: x.numpy()}
                row["engine_vs_ort_cuda"] = engine_t / _cuda_time(lambda: sess.run(None, f))
            else:
                row["engine_vs_ort_cuda"] = "skipped: onnxruntime has no CUDAExecutionProvider here"
        except ImportError:
            row["engine_vs_ort_cuda"] = "skipped: onnxruntime not installed"
        res[f"batch{batch}"] = row
    return res


PARTS = ("cold_switch", "semi_structured_2_4", "fused_fold_cuda", "bank_1000_cuda", "generate_cuda", "trt_builds",
         "trt_strip", "trt_fixed_batch", "trt_missing_weights", "trt_serve", "trt_timings")


def run_all(out_dir: str) -> dict:
    """Every part, each independent; one line per part that is skipped, with its reason."""
    import torch

    out = {}
    with tempfile.TemporaryDirectory() as d:
        eng = _Engines(d)
        fns = {"cold_switch": cold_switch, "semi_structured_2_4": semi_structured,
               "trt_builds": lambda: trt_builds(eng), "trt_strip": lambda: trt_strip(eng),
               "trt_fixed_batch": lambda: trt_fixed_batch(eng), "trt_missing_weights": lambda: trt_missing_weights(eng),
               "trt_serve": lambda: trt_serve(eng), "trt_timings": lambda: trt_timings(eng)}
        from benchmarks.gpu_serving import SERVING_PARTS

        fns.update(SERVING_PARTS)  # the fused fold vs the HBM floor, 1,000 tasks, generation
        for name in PARTS:
            t0 = time.perf_counter()
            try:
                if not torch.cuda.is_available():
                    raise ImportError("no CUDA device")
                out[name] = fns[name]()
            except ImportError as exc:
                out[name] = {"skipped": str(exc) or type(exc).__name__}
                print(f"{name}: skipped ({out[name]['skipped']})", flush=True)
                continue
            except Exception as exc:  # noqa: BLE001 - recorded, the other parts still run
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            out[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(out[name], indent=1), flush=True)
    return out
