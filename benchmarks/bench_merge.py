"""Merge speed and memory: in memory (merge_) and from files (liedeploy merge), against baselines.

ViT-B (transformers ViTConfig() with random weights), every Linear of the encoder adapted, r=16.

In memory (fp32), medians of --reps repetitions, 2 threads:
  liedeploy merge_  vs  the copy limit (clone of the same adapted weights)  vs  PEFT LoRA merge_and_unload
From files (subprocesses, wall time and peak RSS from /usr/bin/time -v), medians of --reps:
  liedeploy merge  vs  cp of the base file  vs  a PEFT script (load, merge_and_unload, save_file),
  and `liedeploy --version` (interpreter + import start-up) measured alone;
  again on a bf16 checkpoint split into 3 shards.

    python benchmarks/bench_merge.py [--reps 5] [--json benchmarks/results/merge_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _timing import median_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RX = r"layers\.\d+\.(attention\.(q|k|v|o)_proj|mlp\.fc(1|2))"
LIEDEPLOY = [sys.executable, "-m", "liedeploy.cli"]


def _vit():
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(), add_pooling_layer=False).eval()


def bench_memory(reps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from liedeploy import LieConfig, apply_adapters_, merge_, unmerge_
    from liedeploy.core.adapt import iter_adapters

    model = _vit()
    apply_adapters_(model, LieConfig(r=16, alpha=16, targets=TARGET_RX + r"\.weight"))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(model):
            lie.lie_B.normal_(0, 0.01)
    weights = [m.parametrizations[a].original for _, m, a, _ in iter_adapters(model)]
    n_elems = sum(w.numel() for w in weights)
    holder = []

    def clone():
        holder[:] = [w.clone() for w in weights]

    t_copy, copy_all = median_time(clone, reps, setup=holder.clear)
    t_lie, lie_all = median_time(lambda: merge_(model), reps, setup=lambda: unmerge_(model))
    unmerge_(model)
    # keep_base=False: folded in place like PEFT's merge; the base comes back from a state dict
    pristine = {n: m.parametrizations[a].original.detach().clone() for n, m, a, _ in iter_adapters(model)}
    t_inpl, inpl_all = median_time(
        lambda: merge_(model, keep_base=False), reps, setup=lambda: unmerge_(model, base=pristine)
    )
    unmerge_(model, base=pristine)

    # the compute floor: exp over as many float32 elements, into preallocated memory
    flat = torch.empty(n_elems).normal_(0, 0.01)
    dest = torch.empty_like(flat)
    t_exp, _ = median_time(lambda: torch.exp(flat, out=dest), reps, warmup=1)
    flat = dest = None
    # the other part of every fold: the rank-16 products alone, into preallocated blocks
    pairs = [(lie.lie_B.detach() * lie.scale, lie.lie_A.detach()) for _, _, _, lie in iter_adapters(model)]
    outs = [torch.empty(B.shape[0], A.shape[1]) for B, A in pairs]

    def products():
        for (B, A), o in zip(pairs, outs):
            torch.mm(B, A, out=o)

    t_mm, _ = median_time(products, reps, warmup=1)
    flops = sum(2 * B.shape[0] * B.shape[1] * A.shape[1] for B, A in pairs)
    pairs = outs = None

    # the fold itself on both paths, into preallocated outputs (as the bank's recycled storage):
    # the fused one (the compiled C kernel) and the blocked eager fallback, alternating
    from liedeploy.core.algebra import fold_sum
    from liedeploy.core.fused import fold_path_reason

    jobs = [(m.parametrizations[a].original.detach(), [(lie.lie_B.detach(), lie.lie_A.detach(), lie.scale)])
            for _, m, a, lie in iter_adapters(model)]
    fold_outs = [torch.empty_like(W) for W, _ in jobs]
    fold_times: dict = {"fused": [], "blocked": []}
    for path in ("fused", "blocked"):  # warm both
        for (W, f), o in zip(jobs, fold_outs):
            fold_sum(W, f, "exact", out=o, path=path)
    for _ in range(reps):
        for path in ("fused", "blocked"):
            t0 = time.perf_counter()
            for (W, f), o in zip(jobs, fold_outs):
                fold_sum(W, f, "exact", out=o, path=path)
            fold_times[path].append(time.perf_counter() - t0)
    jobs = fold_outs = None
    # merge_ on the fallback path (LIEDEPLOY_FOLD=blocked), in the same run
    os.environ["LIEDEPLOY_FOLD"] = "blocked"
    try:
        t_lie_blocked, lie_blocked_all = median_time(lambda: merge_(model), reps, setup=lambda: unmerge_(model))
        unmerge_(model)
    finally:
        os.environ.pop("LIEDEPLOY_FOLD")
    peft_model = [None]

    def peft_setup():
        peft_model[0] = None
        m = _vit()
        pm = get_peft_model(m, LoraConfig(r=16, lora_alpha=16, target_modules=TARGET_RX, init_lora_weights=False))
        peft_model[0] = pm

    t_peft, peft_all = median_time(lambda: peft_model[0].merge_and_unload(), reps, setup=peft_setup)
    return {
        "adapted_elements": n_elems,
        "copy_limit_s": t_copy,
        "liedeploy_merge__s": t_lie,
        "liedeploy_merge_in_place_s": t_inpl,
        "exp_only_s": t_exp,
        "products_only_s": t_mm,
        "products_gflops": flops / t_mm / 1e9,
        "fold_path": fold_path_reason(torch.device("cpu")),
        "fold_fused_s": statistics.median(fold_times["fused"]),
        "fold_blocked_s": statistics.median(fold_times["blocked"]),
        "liedeploy_merge_blocked_s": t_lie_blocked,
        "peft_merge_and_unload_s": t_peft,
        "all": {"copy": copy_all, "liedeploy": lie_all, "liedeploy_blocked": lie_blocked_all,
                "fold_fused": fold_times["fused"], "fold_blocked": fold_times["blocked"], "liedeploy_in_place": inpl_all, "peft": peft_all},
        "ratio_vs_copy": t_lie / t_copy,
        "ratio_vs_peft": t_lie / t_peft,
    }


PEFT_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTModel
from peft import LoraConfig, get_peft_model
m = ViTModel(ViTConfig(), add_pooling_layer=False)
m.load_state_dict(load_file(sys.argv[1]))
pm = get_peft_model(m, LoraConfig(r=16, lora_alpha=16, target_modules=sys.argv[3], init_lora_weights=False))
merged = pm.merge_and_unload()
save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, sys.argv[2])
"""


def _timed(cmd, env=None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, via /usr/bin/time -v."""
    t = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(f"{cmd[:3]} failed: {out.stderr[-1500:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) * 1024
    return wall, rss


def _median_cmd(cmd, reps, env=None, cleanup=None):
    walls, rsss = [], []
    for _ in range(reps):
        w, r = _timed(cmd, env)
        walls.append(w)
        rsss.append(r)
        if cleanup:
            cleanup()
    return statistics.median(walls), max(rsss), walls


def _save_task_adapter(model, path: str) -> str:
    """Adapt every encoder Linear (r=16), give the factors non-zero values, save the adapter file."""
    import torch

    from liedeploy import LieConfig, apply_adapters_, save_adapter
    from liedeploy.core.adapt import iter_adapters

    apply_adapters_(model, LieConfig(r=16, alpha=16, targets=TARGET_RX + r"\.weight"))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(model):
            lie.lie_B.normal_(0, 0.01)
    return save_adapter(model, path)


def bench_files(reps: int, tmp: str, threads: int) -> dict:
    import torch
    from safetensors.torch import save_file

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    model = _vit()
    base = os.path.join(tmp, "vit.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    adapter = _save_task_adapter(model, os.path.join(tmp, "task.safetensors"))
    out = os.path.join(tmp, "merged.safetensors")
    rm = lambda: os.path.exists(out) and os.unlink(out)
    size = os.path.getsize(base)
    res = {"base_bytes": size}
    res["cp"] = _median_cmd(["cp", base, out], reps, env, rm)
    res["startup"] = _median_cmd(LIEDEPLOY + ["--version"], reps, env)
    res["liedeploy_merge"] = _median_cmd(LIEDEPLOY + ["merge", base, adapter, "-o", out], reps, env, rm)
    res["peft_script"] = _median_cmd([sys.executable, "-c", PEFT_SCRIPT, base, out, TARGET_RX], max(1, reps // 2), env, rm)

    # bf16, 3 shards
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in _vit().state_dict().items()}
    keys = list(sd)
    shard_dir = os.path.join(tmp, "bf16")
    os.makedirs(shard_dir, exist_ok=True)
    wm = {}
    for i in range(3):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        part = keys[i * len(keys) // 3 : (i + 1) * len(keys) // 3]
        save_file({k: sd[k] for k in part}, os.path.join(shard_dir, fname))
        wm.update({k: fname for k in part})
    index = os.path.join(shard_dir, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    ad16 = _save_task_adapter(_vit().to(torch.bfloat16), os.path.join(tmp, "task16.safetensors"))
    out_dir = os.path.join(tmp, "bf16-out")
    os.makedirs(out_dir, exist_ok=True)
    rm16 = lambda: shutil.rmtree(out_dir) or os.makedirs(out_dir)
    res["bf16_base_bytes"] = sum(os.path.getsize(os.path.join(shard_dir, f)) for f in set(wm.values()))
    res["bf16_cp"] = _median_cmd(["cp", "-r", shard_dir, out_dir + "/x"], reps, env, rm16)
    res["bf16_liedeploy_merge"] = _median_cmd(
        LIEDEPLOY + ["merge", index, ad16, "-o", os.path.join(out_dir, "model.safetensors.index.json")], reps, env, rm16
    )
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/merge_cpu.json")
    ap.add_argument("--skip-files", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    mem = bench_memory(args.reps)
    print(f"In memory: ViT-B, {mem['adapted_elements'] / 1e6:.1f}M adapted fp32 weights, r=16, "
          f"{args.threads} threads, median of {args.reps}")
    print(f"folds: {mem['fold_path'][0]} ({mem['fold_path'][1]})")
    print(f"{'method':<40} {'ms (min-max)':>20} {'/copy':>7} {'/exp':>7} {'/PEFT':>7}")
    alls = mem["all"]
    for name, key, k_all in [("copy limit (clone)", "copy_limit_s", "copy"),
                             ("liedeploy merge_", "liedeploy_merge__s", "liedeploy"),
                             ("liedeploy merge_, blocked fallback", "liedeploy_merge_blocked_s", "liedeploy_blocked"),
                             ("liedeploy merge_(keep_base=False)", "liedeploy_merge_in_place_s", "liedeploy_in_place"),
                             ("fold_sum, fused (C kernel)", "fold_fused_s", "fold_fused"),
                             ("fold_sum, blocked fallback", "fold_blocked_s", "fold_blocked"),
                             ("PEFT LoRA merge_and_unload", "peft_merge_and_unload_s", "peft"),
                             ("(exp alone over those elements)", "exp_only_s", None),
                             ("(rank-16 products alone, mm)", "products_only_s", None)]:
        t = mem[key]
        spread = f"({min(alls[k_all]) * 1e3:.0f}-{max(alls[k_all]) * 1e3:.0f})" if k_all else ""
        print(f"{name:<40} {t * 1e3:>8.1f} {spread:>11} {t / mem['copy_limit_s']:>7.2f} {t / mem['exp_only_s']:>7.2f} "
              f"{t / mem['peft_merge_and_unload_s']:>7.2f}")
    print(f"(the products ran at {mem['products_gflops']:.0f} GFLOP/s)")
    print(f"fold (fused) / exp alone: {mem['fold_fused_s'] / mem['exp_only_s']:.2f}x (target <= 1.7x); "
          f"merge_ / copy limit: {mem['ratio_vs_copy']:.2f}x (target <= 2.5x); merge_ / exp alone: "
          f"{mem['liedeploy_merge__s'] / mem['exp_only_s']:.2f}x; fused / blocked fold: "
          f"{mem['fold_fused_s'] / mem['fold_blocked_s']:.2f}x; merge_ / PEFT: {mem['ratio_vs_peft']:.2f}x")
    result = {"args": vars(args), "memory": mem}
    if not args.skip_files:
        with tempfile.TemporaryDirectory() as tmp:
            f = bench_files(args.reps, tmp, args.threads)
        result["files"] = f
        st = f["startup"][0]
        print()
        print(f"From files: ViT-B fp32 base {f['base_bytes'] / 2**20:.0f} MiB; bf16 in 3 shards "
              f"{f['bf16_base_bytes'] / 2**20:.0f} MiB; wall = median, RSS = max")
        print(f"{'command':<34} {'wall s':>7} {'peak RSS MiB':>13} {'wall/(2cp+startup)':>19} {'RSS/(0.5 base+400MB)':>21}")
        for name, key, base_key, cpk in [
            ("cp base", "cp", "base_bytes", "cp"),
            ("liedeploy --version (start-up)", "startup", "base_bytes", "cp"),
            ("liedeploy merge", "liedeploy_merge", "base_bytes", "cp"),
            ("PEFT load+merge_and_unload+save", "peft_script", "base_bytes", "cp"),
            ("cp -r bf16 shards", "bf16_cp", "bf16_base_bytes", "bf16_cp"),
            ("liedeploy merge bf16 shards", "bf16_liedeploy_merge", "bf16_base_bytes", "bf16_cp"),
        ]:
            w, r, _ = f[key]
            budget = 2 * f[cpk][0] + st
            rb = 0.5 * f[base_key] + 400 * 2**20
            print(f"{name:<34} {w:>7.2f} {r / 2**20:>13.0f} {w / budget:>19.2f} {r / rb:>21.2f}")
        print("targets: liedeploy merge wall <= 2x cp + start-up (ratio <= 1), peak RSS <= 0.5x base + 400 MB (ratio <= 1)")
        print(f"liedeploy merge vs PEFT script: wall {f['liedeploy_merge'][0] / f['peft_script'][0]:.2f}x, "
              f"peak RSS {f['liedeploy_merge'][1] / f['peft_script'][1]:.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
