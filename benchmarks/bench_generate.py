"""Generating text for many Lie tasks: `liedeploy serve --hf-model` against the single-task ceiling.

A LLaMA-like config (4 layers, hidden 256, r=16 Lie adapters on every Linear), a word-level
tokenizer built here and saved in the model folder (nothing downloads); 16 concurrent streams,
prompts of 64 tokens, 64 new tokens each (greedy), tasks chosen by Zipf(1.1) over 1 or 10 tasks.

Baseline in the same run: (b) the ceiling: the base model's own static batched ``generate()`` over
the same 16 requests arriving together. (The naive per-task server of the issue is not built here.)
The 1-task load is also sent from 2 client processes: about the same tokens/s shows the load
generator is not the bottleneck.

    python benchmarks/bench_generate.py [--runs 3]

Reports tokens/s, time to first token and per-token latency (p50/p99), errors, and whether every
greedy output equals the task's merged model; writes benchmarks/results/generate_cpu.{txt,json}.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = [f"w{i}" for i in range(500)]


def _build(folder: str, n_tasks: int):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from liedeploy import load_adapter, merge_
    from tests.conftest import _write_adapter

    vocab = {w: i for i, w in enumerate(WORDS + ["<eos>", "<pad>", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"], bos_token_id=vocab["<eos>"],
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(os.path.join(folder, "model"))
    fast.save_pretrained(os.path.join(folder, "model"))
    tasks = os.path.join(folder, "tasks")
    os.makedirs(tasks, exist_ok=True)
    refs = {}
    for i in range(n_tasks):
        p = _write_adapter(model, os.path.join(tasks, f"t{i}.safetensors"), r".*(proj)\.weight", r=16, alpha=16,
                           std=0.02, seed=i)
        refs[f"t{i}"] = merge_(load_adapter(copy.deepcopy(model), p)).eval()
    return model, fast, refs


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, n = None, 0
    text = ""
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["text"]
            if delta:
                n += 1
                text += delta
                if first is None:
                    first = time.perf_counter() - t0
    return text, first, time.perf_counter() - t0


def _streams(url: str, jobs: list, new_tokens: int) -> list:
    """Run ``[(task, prompt)]`` as concurrent streams from threads of this process."""
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        return list(ex.map(lambda a: _post(f"{url}/v1/completions", {
            "model": a[0], "prompt": a[1], "max_tokens": new_tokens, "temperature": 0, "stream": True}), jobs))


def _load(url: str, jobs: list, new_tokens: int, procs: int) -> list:
    """The same streams from ``procs`` client processes (answers in the order of ``jobs``)."""
    if procs == 1:
        return _streams(url, jobs, new_tokens)
    parts = [jobs[i::procs] for i in range(procs)]
    with cf.ProcessPoolExecutor(procs) as ex:
        outs = list(ex.map(_streams, [url] * procs, parts, [new_tokens] * procs))
    res = [None] * len(jobs)
    for i, out in enumerate(outs):
        res[i::procs] = out
    return res


def main(argv=None) -> int:
    import numpy as np
    import torch

    from tests.serving.helpers import ServerProcess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    prompts = [" ".join(WORDS[j] for j in rng.integers(0, 500, 64)) for _ in range(args.streams)]
    out = {"runs": {}}
    with tempfile.TemporaryDirectory() as d:
        model, tok, refs = _build(d, 10)
        refs["base"] = model
        # (b) the ceiling: one static batched generate() of the base over the same requests
        ids = tok(prompts, return_tensors="pt", padding=True)
        ceiling = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)
            ceiling.append(args.streams * args.new_tokens / (time.perf_counter() - t0))
        out["runs"]["ceiling: base, static batched generate()"] = ceiling
        server = ["--hf-model", os.path.join(d, "model"), "--adapters", os.path.join(d, "tasks"), "--max-sequences",
                  str(args.streams), "--max-new-tokens", str(args.new_tokens)]
        with ServerProcess(server, timeout=300) as srv:
            for n_tasks, procs in ((1, 1), (1, 2), (10, 1)):
                w = 1.0 / np.arange(1, n_tasks + 1) ** 1.1
                rates, ttft, per_tok, wrong = [], [], [], 0
                for run in range(args.runs):
                    tasks = [f"t{i}" for i in np.random.default_rng(run).choice(n_tasks, args.streams, p=w / w.sum())]
                    t0 = time.perf_counter()
                    res = _load(srv.url, list(zip(tasks, prompts)), args.new_tokens, procs)
                    wall = time.perf_counter() - t0
                    toks = sum(len(tok(r[0])["input_ids"]) for r in res)
                    rates.append(toks / wall)
                    ttft += [r[1] for r in res if r[1] is not None]
                    per_tok += [(r[2] - r[1]) / max(1, args.new_tokens - 1) for r in res if r[1] is not None]
                    if run == 0:  # greedy equality against each task's merged model
                        for (task, prompt), r in zip(zip(tasks, prompts), res):
                            p_ids = torch.tensor([tok(prompt)["input_ids"]])
                            with torch.no_grad():
                                g = refs[task].generate(input_ids=p_ids, attention_mask=torch.ones_like(p_ids),
                                                        max_new_tokens=args.new_tokens, do_sample=False,
                                                        pad_token_id=tok.pad_token_id)
                            wrong += tok.decode(g[0, p_ids.shape[1]:], skip_special_tokens=True) != r[0]
                label = (f"liedeploy serve: {n_tasks} task(s) Zipf(1.1), {args.streams} streams"
                         + (f", {procs} client processes" if procs > 1 else ""))
                out["runs"][label] = rates
                out[label] = {"ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
                              "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
                              "per_token_p50_ms": 1e3 * float(np.percentile(per_tok, 50)),
                              "per_token_p99_ms": 1e3 * float(np.percentile(per_tok, 99)),
                              "greedy_mismatches": wrong}
    med = {k: statistics.median(v) for k, v in out["runs"].items()}
    ceil = med["ceiling: base, static batched generate()"]
    lines = [f"tokens/s, medians of {args.runs} runs (range); {args.streams} streams x {args.new_tokens} new tokens, "
             "prompts of 64 tokens, greedy",
             "| configuration | tokens/s | vs ceiling | TTFT p50 / p99 ms | per token p50 / p99 ms | greedy mismatches |",
             "|---|---|---|---|---|---|"]
    for k, v in out["runs"].items():
        extra = out.get(k, {})
        lines.append(f"| {k} | {med[k]:.0f} ({min(v):.0f}-{max(v):.0f}) | {med[k] / ceil:.2f}x | "
                     + (f"{extra['ttft_p50_ms']:.0f} / {extra['ttft_p99_ms']:.0f} | {extra['per_token_p50_ms']:.1f} / "
                        f"{extra['per_token_p99_ms']:.1f} | {extra['greedy_mismatches']} |" if extra else "- | - | - |"))
    one = "liedeploy serve: 1 task(s) Zipf(1.1), " + f"{args.streams} streams"
    lines.append(f"2 client processes / 1, 1 task: {med[one + ', 2 client processes'] / med[one]:.2f}x "
                 "(about 1x: the load generator is not the bottleneck)")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "benchmarks", "results", "generate_cpu.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(ROOT, "benchmarks", "results", "generate_cpu.json"), "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
