"""CUDA parts of gpu_check.py for serving speed and text generation (each independent; called by
``gpu_extra.run_all``):

- ``fused_fold_cuda``: the fold of a ViT-B-like set of adapted weights (85M elements, fp16 and fp32)
  on the fused (Triton) and blocked paths, against the HBM floor measured on the same device (a
  copy of W: one read and one write of the same bytes), with the fused result checked against a
  float64 reference on a slice;
- ``bank_1000_cuda``: an AdapterBank on CUDA over 1,000 tasks (hard links of 20 distinct adapter
  files, each task folded on its own), Zipf(1.1) batches of 16, against the 1-task ceiling;
- ``generate_cuda``: the continuous-batching engine of ``liedeploy serve --hf-model`` on CUDA
  (16 streams, 64-token prompts, 64 new tokens, greedy) for 1 and 10 tasks against the base's
  static batched ``generate()`` on the same GPU, with every greedy output checked against the
  task's merged model.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

__all__ = ["fused_fold_cuda", "bank_1000_cuda", "generate_cuda", "SERVING_PARTS"]


def _time(fn, reps=10, warmup=2):
    from benchmarks.gpu_extra import _cuda_time

    return _cuda_time(fn, reps=reps, warmup=warmup)


def fused_fold_cuda() -> dict:
    import torch

    from liedeploy.core.algebra import fold_sum

    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(768, 768)] * 4 * 12 + [(3072, 768), (768, 3072)] * 12  # ViT-B's adapted Linear weights
    for dtype in (torch.float16, torch.float32):
        Ws = [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]
        BAs = [(torch.randn(s[0], 16, device="cuda", generator=g).to(dtype) * 0.02,
                torch.randn(16, s[1], device="cuda", generator=g).to(dtype) * 0.02) for s in shapes]
        outs = [torch.empty_like(w) for w in Ws]

        def fold(path):
            for w, (b, a), o in zip(Ws, BAs, outs):
                fold_sum(w, [(b, a, 1.0)], "exact", out=o, path=path)

        floor = _time(lambda: [o.copy_(w) for w, o in zip(Ws, outs)])
        row = {"copy_floor_ms": 1e3 * floor, "elements": sum(w.numel() for w in Ws)}
        for path in ("fused", "blocked"):
            try:
                t = _time(lambda: fold(path))
                row[f"{path}_ms"], row[f"{path}_vs_floor"] = 1e3 * t, t / floor
            except Exception as exc:  # noqa: BLE001 - no Triton: the blocked path only
                row[f"{path}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        fold("fused" if "fused_ms" in row else "blocked")
        w, (b, a), o = Ws[-1], BAs[-1], outs[-1]
        ref = w.double() * torch.exp(b.double() @ a.double())
        row["max_rel_err_vs_float64"] = float(((o.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        out[str(dtype).replace("torch.", "")] = row
    return out


def bank_1000_cuda() -> dict:
    import numpy as np
    import torch

    from benchmarks.serve_models import resnet18
    from liedeploy import AdapterBank
    from tests.conftest import _write_adapter

    model = resnet18().eval()
    with tempfile.TemporaryDirectory() as d:
        distinct = [_write_adapter(model, os.path.join(d, f"d{i}.safetensors"), r".*(convolution|classifier.*)\.weight",
                                   r=16, std=0.01, seed=i) for i in range(20)]
        paths = {}
        for i in range(1000):
            p = os.path.join(d, f"t{i}.safetensors")
            os.link(distinct[i % 20], p)
            paths[f"t{i}"] = p
        bank = AdapterBank(model.cuda(), adapters=paths, cache_bytes=2 * 10**9, device=torch.device("cuda"))
        x = torch.randn(16, 3, 64, 64, device="cuda")
        rng = np.random.default_rng(0)
        w = 1.0 / np.arange(1, 1001) ** 1.1
        tasks = [f"t{i}" for i in rng.choice(1000, 400, p=w / w.sum())]
        with torch.inference_mode():
            ceiling = _time(lambda: bank(x, task="t0"), reps=20)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for t in tasks:
                bank(x, task=t)
            torch.cuda.synchronize()
            per_batch = (time.perf_counter() - t0) / len(tasks)
        return {"batches": len(tasks), "batch": 16, "ceiling_ms": 1e3 * ceiling, "zipf_1000_ms": 1e3 * per_batch,
                "zipf_1000_vs_ceiling_throughput": ceiling / per_batch, "folds": bank.stats.get("folds", None)}


def generate_cuda() -> dict:
    import numpy as np
    import torch

    from benchmarks.bench_generate import WORDS, _build
    from liedeploy import AdapterBank
    from liedeploy.serving.generate import GenerationParams, Generator

    out = {}
    with tempfile.TemporaryDirectory() as d:
        model, tok, mdir, tasks_dir, merged_dir = _build(d, 10)
        model = model.cuda()
        rng = np.random.default_rng(0)
        prompts = [[int(t) for t in rng.integers(0, len(WORDS), 64)] for _ in range(16)]
        ids = torch.tensor(prompts, device="cuda")
        with torch.no_grad():
            t = _time(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                             min_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id), reps=3)
        out["ceiling_tokens_per_s"] = 16 * 64 / t
        bank = AdapterBank(copy.deepcopy(model), adapters={f"t{i}": os.path.join(tasks_dir, f"t{i}.safetensors")
                                                           for i in range(10)}, device=torch.device("cuda"))
        gen = Generator(bank, tok, max_sequences=16, max_new_tokens=64)
        try:
            for n in (1, 10):
                names = [f"t{i % n}" for i in range(16)]

                async def run():
                    seqs = [gen.start(t, p, GenerationParams(64, 0.0, 1.0, None, [])) for t, p in zip(names, prompts)]
                    t0 = time.perf_counter()
                    await asyncio.gather(*(gen.complete(s) for s in seqs))
                    return seqs, time.perf_counter() - t0

                asyncio.run(run())  # warm-up
                seqs, wall = asyncio.run(run())
                wrong = 0
                for name, p, s in zip(names, prompts, seqs):
                    ref = copy.deepcopy(model)
                    from liedeploy import load_adapter, merge_

                    ref = merge_(load_adapter(ref, os.path.join(tasks_dir, f"{name}.safetensors"))).eval()
                    x = torch.tensor([p], device="cuda")
                    with torch.no_grad():
                        want = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=64,
                                            do_sample=False, pad_token_id=tok.pad_token_id)[0, 64:].tolist()
                    wrong += s.tokens != [t for t in want if t != tok.eos_token_id][:len(s.tokens)]
                rate = sum(len(s.tokens) for s in seqs) / wall
                out[f"{n}_tasks"] = {"tokens_per_s": rate, "vs_ceiling": rate / out["ceiling_tokens_per_s"],
                                     "greedy_mismatches": wrong}
        finally:
            gen.engine.close()
    return out


SERVING_PARTS = {"fused_fold_cuda": fused_fold_cuda, "bank_1000_cuda": bank_1000_cuda, "generate_cuda": generate_cuda}
