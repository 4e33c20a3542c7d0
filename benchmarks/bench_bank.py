"""Serving many tasks: AdapterBank switches, mixed-task throughput and memory, against PEFT.

CPU, 2 threads. ViT-B config (random weights, r=16 on every encoder Linear; 64x64 inputs so that
a batch of 32 runs in well under a second) and a ResNet-50-like config (r=16 on every conv).
- switch: cold (task not cached, the cache holds one task: fold into the evicted task's recycled
  storage + replica) vs merge_ of the same adapter, vs PEFT with 8 LoRA
  adapters loaded doing unmerge + set_adapter + merge, vs PEFT hotswap_adapter (from disk);
  hot (cached) switch.
- mixed batches of 8 tasks: AdapterBank.forward_mixed vs PEFT LoRA adapter_names= (unmerged), vs
  one merged model per task run in sequence; samples per task 1..16 to find the crossover.
- memory: bytes per cached task vs a full model copy.
Medians of --reps; ratios from this one run.

    python benchmarks/bench_bank.py [--reps 5] [--json benchmarks/results/bank_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

from _timing import median_time

VIT_RX = r"layers\.\d+\.(attention\.(q|k|v|o)_proj|mlp\.fc(1|2))"
RESNET_RX = r".*layer\.\d\.convolution"


def _models():
    import torch
    from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=64, patch_size=16), add_pooling_layer=False).eval()
    resnet = ResNetModel(ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                      layer_type="bottleneck")).eval()
    return {"ViT-B": (vit, VIT_RX, (3, 64, 64)), "ResNet-50": (resnet, RESNET_RX, (3, 64, 64))}


def _out(y):
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def bench(name, model, rx, shape, reps, tmp):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.hotswap import hotswap_adapter

    from liedeploy import AdapterBank, LieConfig, apply_adapters_, load_adapter, merge_, save_adapter, unmerge_
    from liedeploy.core.adapt import iter_adapters

    paths = []
    for i in range(8):
        m = apply_adapters_(copy.deepcopy(model), LieConfig(r=16, alpha=16, targets=rx + r"\.weight"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, _, _, lie in iter_adapters(m):
                lie.lie_B.copy_(torch.randn(lie.lie_B.shape, generator=g) * 0.01)
        p = os.path.join(tmp, f"{name}-t{i}.safetensors")
        save_adapter(m, p, name=f"t{i}")
        paths.append(p)
    res = {}
    # cold / hot switch
    probe = AdapterBank(model, adapters={"t0": paths[0]})
    probe.prefetch("t0")
    one_task = probe.cached_bytes
    del probe
    # room for one task: every switch to another task is cold
    bank = AdapterBank(copy.deepcopy(model), adapters={f"t{i}": p for i, p in enumerate(paths)}, cache_bytes=one_task)
    bank.prefetch("t0")
    turn = {"i": 0}

    def cold():
        turn["i"] = (turn["i"] + 1) % 8
        bank.prefetch(f"t{turn['i']}")

    res["cold_switch_s"] = median_time(cold, reps)[0]
    res["hot_switch_s"] = median_time(lambda: bank.prefetch(f"t{turn['i']}"), reps * 20)[0]
    live = load_adapter(copy.deepcopy(model), paths[0])
    res["merge__s"] = median_time(lambda: merge_(live), reps, setup=lambda: unmerge_(live))[0]
    # PEFT: 8 LoRA adapters, switch = unmerge + set_adapter + merge
    lcfg = dict(r=16, lora_alpha=16, target_modules=rx, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**lcfg), adapter_name="t0")
    for i in range(1, 8):
        pm.add_adapter(f"t{i}", LoraConfig(**lcfg))
    state = {"i": 0}

    def peft_switch():
        state["i"] = (state["i"] + 1) % 8
        pm.base_model.unmerge_adapter()
        pm.set_adapter(f"t{state['i']}")
        pm.base_model.merge_adapter()

    pm.base_model.merge_adapter()
    res["peft_set_adapter_merge_s"] = median_time(peft_switch, reps)[0]
    pm.base_model.unmerge_adapter()
    # PEFT hotswap_adapter (loads the other adapter's weights from disk, copy_ in place)
    lora_dirs = []
    for i in range(2):
        d = os.path.join(tmp, f"{name}-lora{i}")
        one = get_peft_model(copy.deepcopy(model), LoraConfig(**lcfg))
        one.save_pretrained(d)
        lora_dirs.append(d)
    hm = PeftModel.from_pretrained(copy.deepcopy(model), lora_dirs[0])
    k = {"i": 0}

    def hot():
        k["i"] ^= 1
        hotswap_adapter(hm, lora_dirs[k["i"]], adapter_name="default", torch_device="cpu")

    res["peft_hotswap_s"] = median_time(hot, reps)[0]
    # memory, mixed batches: a bank with room for every task
    del bank
    bank = AdapterBank(copy.deepcopy(model), adapters={f"t{i}": p for i, p in enumerate(paths)})
    bank.prefetch("t1")
    per_task = bank.cached_bytes // max(len(bank.resident), 1)
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    res["bytes_per_task"], res["bytes_full_model"] = per_task, full
    # mixed-task throughput: 8 tasks, s samples each
    merged_models = [merge_(load_adapter(copy.deepcopy(model), p), keep_base=False) for p in paths]
    for i in range(8):
        bank.model_for(f"t{i}")
    pm_mixed = pm.eval()  # unmerged PEFT, all 8 adapters loaded
    mixed = {}
    for s in (1, 4, 16):
        x = torch.randn(8 * s, *shape)
        tasks = [f"t{i % 8}" for i in range(8 * s)]
        with torch.no_grad():
            t_bank = median_time(lambda: bank.forward_mixed(x, tasks), reps)[0] if s else 0
            t_peft = median_time(lambda: pm_mixed(x, adapter_names=tasks), reps)[0]
            order = sorted(range(len(tasks)), key=lambda j: tasks[j])

            def seq():
                for i, m in enumerate(merged_models):
                    m(x[[j for j in order if tasks[j] == f"t{i}"]])

            t_seq = median_time(seq, reps)[0]
        mixed[s] = {"bank_s": t_bank, "peft_mixed_s": t_peft, "separate_models_s": t_seq}
    res["mixed"] = mixed
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/bank_cpu.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, rx, shape) in _models().items():
            results[name] = bench(name, model, rx, shape, args.reps, tmp)
    print(f"CPU, {args.threads} threads, r=16, median of {args.reps}")
    print(f"{'model':<10} {'cold ms':>8} {'cold/merge_':>12} {'cold/PEFT set+merge':>20} {'cold/PEFT hotswap':>18} "
          f"{'hot ms':>8} {'task MiB':>9} {'task/full copy':>15}")
    for name, r in results.items():
        print(f"{name:<10} {r['cold_switch_s'] * 1e3:>8.1f} {r['cold_switch_s'] / r['merge__s']:>12.2f} "
              f"{r['cold_switch_s'] / r['peft_set_adapter_merge_s']:>20.2f} {r['cold_switch_s'] / r['peft_hotswap_s']:>18.2f} "
              f"{r['hot_switch_s'] * 1e3:>8.3f} {r['bytes_per_task'] / 2**20:>9.1f} "
              f"{r['bytes_per_task'] / r['bytes_full_model']:>15.2f}")
    print("targets: cold <= 1.1x merge_, hot <= 1 ms")
    print()
    print(f"{'model':<10} {'samples/task':>12} {'bank ms':>9} {'bank/PEFT mixed':>16} {'bank/separate models':>21}")
    for name, r in results.items():
        for s, m in r["mixed"].items():
            print(f"{name:<10} {s:>12} {m['bank_s'] * 1e3:>9.1f} {m['bank_s'] / m['peft_mixed_s']:>16.2f} "
                  f"{m['bank_s'] / m['separate_models_s']:>21.2f}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
