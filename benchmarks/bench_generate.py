"""Generating text for many Lie tasks: `liedeploy serve --hf-model` against a competent naive
server and against the single-task ceiling.

A LLaMA-like config (4 layers, hidden 256, r=16 Lie adapters on every Linear), a word-level
tokenizer built here and saved in the model folder (nothing downloads); 16 concurrent streams,
prompts of 64 tokens, 64 new tokens each (greedy), tasks chosen by Zipf(1.1) over 1, 10 or 100 tasks.

Baselines in the same run:
(a) a naive server (benchmarks/naive_generate_server.py): an LRU of merged per-task models within
    the same memory budget as liedeploy's --cache-bytes, single-flight loads, prebuilt skeletons,
    each request generating alone with transformers' generate(); workers x torch threads swept over
    the machine's cores (the best is the baseline, the sweep is printed);
(b) the ceiling: the base model's own static batched generate() over the same 16 requests arriving
    together; with --transformers-cb also transformers' continuous batching (generate_batch).
The 1-task load is also sent from 2 client processes: about the same tokens/s shows the load
generator is not the bottleneck.

    python benchmarks/bench_generate.py [--runs 3] [--transformers-cb]

Reports tokens/s, time to first token and inter-token gaps (p50/p99), errors, folds or loads,
peak RSS, and whether every greedy output equals the task's merged model; writes
benchmarks/results/generate_cpu.{txt,json}.
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


def _build(folder: str, n_tasks: int, dtype=None):
    """The model folder, ``n_tasks`` adapter files and, for the naive server, their merged weights
    (``dtype``: the model saved, and its adapters made, in that torch dtype)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from liedeploy import merge_files
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
    if dtype is not None:
        model = model.to(dtype)
    mdir = os.path.join(folder, "model")
    model.save_pretrained(mdir)
    fast.save_pretrained(mdir)
    tasks, merged = os.path.join(folder, "tasks"), os.path.join(folder, "merged")
    os.makedirs(tasks, exist_ok=True)
    os.makedirs(merged, exist_ok=True)
    for i in range(n_tasks):
        p = _write_adapter(model, os.path.join(tasks, f"t{i}.safetensors"), r".*(proj)\.weight", r=16, alpha=16,
                           std=0.02, seed=i)
        merge_files(os.path.join(mdir, "model.safetensors"), [p], os.path.join(merged, f"t{i}.safetensors"))
    return model, fast, mdir, tasks, merged


def _post(url, payload):
    """One stream: ``(text, time to first chunk, total time, gaps between chunks)``."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps, text = [], ""
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["text"]
            if delta:
                text += delta
                stamps.append(time.perf_counter())
    first = stamps[0] - t0 if stamps else None
    return text, first, time.perf_counter() - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def _streams(url: str, jobs: list, new_tokens: int) -> list:
    """Run ``[(task, prompt)]`` as concurrent streams from threads of this process."""
    def one(a):
        try:
            return _post(f"{url}/v1/completions", {"model": a[0], "prompt": a[1], "max_tokens": new_tokens,
                                                   "temperature": 0, "stream": True})
        except Exception as exc:  # noqa: BLE001 - counted as an error
            return (None, None, 0.0, [], repr(exc))

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        return list(ex.map(one, jobs))


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


def _loads(srv) -> int:
    """Folds (liedeploy) or merged-model loads (the naive server) so far."""
    try:
        text = urllib.request.urlopen(srv.url + "/metrics", timeout=10).read().decode()
        return int(float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("liedeploy_folds_total"))))
    except (urllib.error.HTTPError, StopIteration):
        return int(json.loads(urllib.request.urlopen(srv.url + "/loads", timeout=10).read())["loads"])


class _Refs:
    """Each task's merged model (from the merged files), built when first asked, for greedy checks."""

    def __init__(self, base, merged_dir):
        self.base, self.dir, self.models = base, merged_dir, {"base": base}

    def __getitem__(self, task):
        if task not in self.models:
            from safetensors.torch import load_file

            m = copy.deepcopy(self.base)
            m.load_state_dict(load_file(os.path.join(self.dir, f"{task}.safetensors")))
            self.models[task] = m.eval()
        return self.models[task]


def _drive(srv, label, n_tasks, procs, prompts, args, tok, refs, out, check):
    import numpy as np
    import torch

    from benchmarks.bench_serve import _peak_rss

    w = 1.0 / np.arange(1, n_tasks + 1) ** 1.1
    _streams(srv.url, [("t0", prompts[0]), ("t0", prompts[1])], 4)  # warm-up, not timed
    loads0 = _loads(srv)
    rates, ttft, gaps, wrong, errors = [], [], [], 0, 0
    for run in range(args.runs):
        tasks = [f"t{i}" for i in np.random.default_rng(run).choice(n_tasks, args.streams, p=w / w.sum())]
        t0 = time.perf_counter()
        res = _load(srv.url, list(zip(tasks, prompts)), args.new_tokens, procs)
        wall = time.perf_counter() - t0
        errors += sum(r[0] is None for r in res)
        res_ok = [r for r in res if r[0] is not None]
        rates.append(sum(len(tok(r[0])["input_ids"]) for r in res_ok) / wall)
        ttft += [r[1] for r in res_ok if r[1] is not None]
        gaps += [g for r in res_ok for g in r[3]]
        if run == 0 and check:  # greedy equality against each task's merged model
            for (task, prompt), r in zip(zip(tasks, prompts), res):
                p_ids = torch.tensor([tok(prompt)["input_ids"]])
                with torch.no_grad():
                    g = refs[task].generate(input_ids=p_ids, attention_mask=torch.ones_like(p_ids),
                                            max_new_tokens=args.new_tokens, do_sample=False,
                                            pad_token_id=tok.pad_token_id)
                wrong += r[0] is None or tok.decode(g[0, p_ids.shape[1]:], skip_special_tokens=True) != r[0]
    out["runs"][label] = rates
    out[label] = {"ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)), "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
                  "gap_p50_ms": 1e3 * float(np.percentile(gaps, 50)), "gap_p99_ms": 1e3 * float(np.percentile(gaps, 99)),
                  "greedy_mismatches": wrong if check else None, "errors": errors,
                  "folds_or_loads": _loads(srv) - loads0,
                  "peak_rss_mb": _peak_rss(srv.p.pid) / 1e6}
    print(f"{label}: {statistics.median(rates):.0f} tokens/s", flush=True)


def _transformers_cb(model, tok, prompts, new_tokens) -> float:
    """transformers' own continuous batching (generate_batch, paged attention), one run: tokens/s."""
    from transformers import GenerationConfig

    ids = [tok(p)["input_ids"] for p in prompts]
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    model.generate_batch(inputs=ids, generation_config=cfg)
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def main(argv=None) -> int:
    import numpy as np
    import torch

    from benchmarks.bench_serve import Proc

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget-mb", type=float, default=50.0, help="memory for folded / merged tasks, both servers")
    ap.add_argument("--transformers-cb", action="store_true", help="also time transformers' generate_batch")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    prompts = [" ".join(WORDS[j] for j in rng.integers(0, 500, 64)) for _ in range(args.streams)]
    out = {"runs": {}, "naive_sweep": {}}
    budget = int(args.budget_mb * 1e6)
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as d:
        model, tok, mdir, tasks_dir, merged_dir = _build(d, 100)
        os.sync()  # the 1.2 GB of merged files are on disk before anything is timed
        refs = _Refs(model, merged_dir)
        # (b) the ceiling: one static batched generate() of the base over the same requests
        ids = tok(prompts, return_tensors="pt", padding=True)
        ceiling = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)
            ceiling.append(args.streams * args.new_tokens / (time.perf_counter() - t0))
        out["runs"][CEILING] = ceiling
        if args.transformers_cb:
            try:
                out["runs"]["transformers continuous batching (generate_batch), base"] = [
                    _transformers_cb(model, tok, prompts, args.new_tokens)]
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                out["transformers_cb_error"] = f"{type(exc).__name__}: {exc}"
        server = ["serve", "--host", "127.0.0.1", "--port", "0", "--hf-model", mdir, "--adapters", tasks_dir,
                  "--max-sequences", str(args.streams), "--max-new-tokens", str(args.new_tokens),
                  "--cache-bytes", str(budget)]
        srv = Proc([sys.executable, "-m", "liedeploy.cli", *server])
        try:
            for n_tasks, procs in ((1, 1), (1, 2), (10, 1), (100, 1)):
                label = f"liedeploy serve: {n_tasks} task(s)" + (f", {procs} client processes" if procs > 1 else "")
                _drive(srv, label, n_tasks, procs, prompts, args, tok, refs, out, check=True)
        finally:
            srv.stop()
        srv = Proc([sys.executable, "-m", "liedeploy.cli", *server, "--cache-policy", "lru"])
        try:  # the same server keeping the most recently used tasks instead of the most used
            _drive(srv, "liedeploy serve --cache-policy lru: 10 task(s)", 10, 1, prompts, args, tok, refs, out, check=False)
        finally:
            srv.stop()
        # (a) the naive server: sweep workers x threads over the cores on 10 tasks, keep the best
        sweep = sorted({(w, max(1, cores // w)) for w in (1, 2, cores)})
        best = None
        for w, th in sweep:
            naive = Proc([sys.executable, os.path.join(ROOT, "benchmarks", "naive_generate_server.py"), "--model", mdir,
                          "--merged", merged_dir, "--budget-bytes", str(budget), "--workers", str(w),
                          "--threads", str(th)])
            try:
                label = f"naive {w}x{th}: 10 task(s)"
                _drive(naive, label, 10, 1, prompts, args, tok, refs, out, check=(w, th) == sweep[0])
                out["naive_sweep"][f"{w}x{th}"] = statistics.median(out["runs"][label])
                if best is None or out["naive_sweep"][f"{w}x{th}"] > out["naive_sweep"][best]:
                    best = f"{w}x{th}"
            finally:
                naive.stop()
        w, th = (int(x) for x in best.split("x"))
        naive = Proc([sys.executable, os.path.join(ROOT, "benchmarks", "naive_generate_server.py"), "--model", mdir,
                      "--merged", merged_dir, "--budget-bytes", str(budget), "--workers", str(w), "--threads", str(th)])
        try:
            for n_tasks in (1, 100):
                _drive(naive, f"naive {best}: {n_tasks} task(s)", n_tasks, 1, prompts, args, tok, refs, out, check=False)
        finally:
            naive.stop()
    out["naive_best"] = best
    _report(out, args, best, budget)
    return 0


CEILING = "ceiling (b): base, static batched generate()"


def _report(out, args, best, budget) -> None:
    med = {k: statistics.median(v) for k, v in out["runs"].items()}
    ceil = med[CEILING]
    lines = [f"tokens/s, medians of {args.runs} runs (range); {args.streams} streams x {args.new_tokens} new tokens, "
             f"prompts of 64 tokens, greedy, Zipf(1.1) over the tasks; memory budget {budget / 1e6:.0f} MB for both "
             f"servers; naive sweep (workers x threads, 10 tasks): "
             + ", ".join(f"{k} {v:.0f}" for k, v in out["naive_sweep"].items()) + f" -> best {best}",
             "| configuration | tokens/s | vs ceiling | TTFT p50 / p99 ms | inter-chunk p50 / p99 ms | errors | "
             "greedy mismatches | folds / loads | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, v in out["runs"].items():
        e = out.get(k, {})
        lines.append(f"| {k} | {med[k]:.0f} ({min(v):.0f}-{max(v):.0f}) | {med[k] / ceil:.2f}x | "
                     + (f"{e['ttft_p50_ms']:.0f} / {e['ttft_p99_ms']:.0f} | {e['gap_p50_ms']:.1f} / {e['gap_p99_ms']:.1f}"
                        f" | {e['errors']} | {'-' if e['greedy_mismatches'] is None else e['greedy_mismatches']} | "
                        f"{e['folds_or_loads']} | {e['peak_rss_mb']:.0f} |" if e else "- | - | - | - | - | - |"))
    ratios = {
        "10 tasks: liedeploy / naive (a) (target >= 3x)": med["liedeploy serve: 10 task(s)"] / med[f"naive {best}: 10 task(s)"],
        "100 tasks: liedeploy / naive (a)": med["liedeploy serve: 100 task(s)"] / med[f"naive {best}: 100 task(s)"],
        "1 task: liedeploy / naive (a)": med["liedeploy serve: 1 task(s)"] / med[f"naive {best}: 1 task(s)"],
        "1 task: liedeploy / ceiling (b) (target >= 0.7x)": med["liedeploy serve: 1 task(s)"] / ceil,
        "10 tasks: default cache (most used kept) / --cache-policy lru":
            med["liedeploy serve: 10 task(s)"] / med["liedeploy serve --cache-policy lru: 10 task(s)"],
        "1 task: 2 client processes / 1 (about 1x: the load generator is not the bottleneck)":
            med["liedeploy serve: 1 task(s), 2 client processes"] / med["liedeploy serve: 1 task(s)"],
    }
    lines += [f"{k}: {v:.2f}x" for k, v in ratios.items()]
    if "transformers_cb_error" in out:
        lines.append(f"transformers continuous batching failed: {out['transformers_cb_error']}")
    out["ratios"] = ratios
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "benchmarks", "results", "generate_cpu.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(ROOT, "benchmarks", "results", "generate_cpu.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
