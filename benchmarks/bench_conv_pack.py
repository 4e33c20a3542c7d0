"""Conv2d weights prepacked in oneDNN's blocked layout vs torch eager, and what the packed fold costs.

    python benchmarks/bench_conv_pack.py [--reps 9] [--threads 2]

On bench_serve's model (ResNet-18-like at 64x64, 45 MB of float32 weights, 2 torch threads, or
``--threads 1``: what each worker process of ``serve --processes 2`` gets here):

- a forward per batch size, each batch on the next of 10 task replicas (weights out of cache, as a
  many-task server meets them): torch eager (``nn.Conv2d``: oneDNN reorders each weight on every
  call; torch's im2col at batch 1) vs the same replicas with every Conv2d weight packed
  (:mod:`liedeploy.core.conv_pack`, ``mkldnn._convolution_pointwise``); each fed a contiguous input
  and a channels-last one (torch's advice for convnets on CPU; the server feeds packed models so),
  the baseline being the faster eager variant at each batch, with the largest output difference;
  and the packed forward on one replica every time (its weights stay in cache as far as they fit:
  what the replicas' weight traffic costs); and the same replicas run as the fused graph a packing
  bank serves them with (:mod:`liedeploy.core.conv_graph`: batch norms folded into the packed
  convolutions, ReLU and residual adds as oneDNN post-ops) against the packed modules;
- a task's fold of every Conv2d weight (rank 16): the dense fused fold (the baseline), the fold
  written straight into the blocked layout (what a packing bank does), and the dense fold followed
  by oneDNN's own reorder (what packing would cost without it).

Medians of ``--reps`` rounds. Writes benchmarks/results/conv_pack_cpu.{txt,json}
(``--threads 1``: conv_pack_1thread_cpu.{txt,json}).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BATCHES = (1, 2, 4, 8, 16)


def _median_ms(fn, reps: int) -> float:
    from benchmarks._timing import median_time

    return 1e3 * median_time(fn, reps, warmup=1)[0]


def main(argv=None) -> int:
    import torch

    from benchmarks._results import write_results
    from benchmarks.serve_models import resnet18
    from liedeploy.core import conv_graph, conv_pack
    from liedeploy.core.algebra import fold_sum

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (default 2: the cores here; 1: what each --processes worker gets), "
                         "results in conv_pack_cpu (2) or conv_pack_{N}thread_cpu")
    args = ap.parse_args(argv)
    if conv_pack.pack_status() != "ready":
        print(f"conv weights cannot be packed here: {conv_pack.pack_status()}")
        return 1
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    torch.manual_seed(0)
    base = resnet18().eval()
    plans = conv_pack.plan_convs(base, lambda m: m(torch.zeros(1, 3, 64, 64)), (1, 16))
    sd = base.state_dict()
    eager = [copy.deepcopy(base) for _ in range(10)]
    packed = [conv_pack.pack_model(copy.deepcopy(m), plans) for m in eager]
    graph, why = conv_graph.capture(base, lambda m: m(torch.zeros(1, 3, 64, 64)), plans, dict(base.state_dict()),
                                    lambda n, d: plans[n].pack(d))
    graphs = []  # the same replicas as one fused graph each (batch norms folded in, ReLU and adds fused)
    for m in eager if graph is not None else []:
        state = m.state_dict()
        graphs.append(graph.replica(graph.lookup(graph.base_values(state, lambda n, d: plans[n].pack(d)), state)))
    forward: dict = {}
    with torch.inference_mode():
        for b in BATCHES:
            x = torch.randn(b, 3, 64, 64)
            xl = x.contiguous(memory_format=torch.channels_last)
            diff = max(float((e(x) - p(xl)).abs().max()) for e, p in zip(eager[:2], packed[:2]))
            te = _median_ms(lambda: [m(x) for m in eager], args.reps) / len(eager)
            tel = _median_ms(lambda: [m(xl) for m in eager], args.reps) / len(eager)
            tp = _median_ms(lambda: [m(x) for m in packed], args.reps) / len(packed)
            tl = _median_ms(lambda: [m(xl) for m in packed], args.reps) / len(packed)
            one = _median_ms(lambda: [packed[0](xl) for _ in packed], args.reps) / len(packed)  # weights in cache
            forward[b] = {"eager_ms": te, "eager_channels_last_ms": tel, "best_eager_ms": min(te, tel),
                          "packed_ms": tp, "packed_channels_last_ms": tl, "packed_channels_last_one_replica_ms": one,
                          "max_abs_diff": diff}
            if graphs:
                forward[b]["fused_graph_ms"] = _median_ms(lambda: [m(xl) for m in graphs], args.reps) / len(graphs)
                forward[b]["fused_graph_max_abs_diff"] = max(float((e(x) - m(xl)).abs().max())
                                                             for e, m in zip(eager[:2], graphs[:2]))

    g = torch.Generator().manual_seed(1)
    factors = {n: (torch.randn(p.shape[0], 16, generator=g) * 0.02, torch.randn(16, p.columns, generator=g) * 0.02)
               for n, p in plans.items()}
    base_packed = {n: p.pack(sd[n]) for n, p in plans.items()}
    out_packed = {n: t.clone() for n, t in base_packed.items()}
    out_dense = {n: torch.empty_like(sd[n]) for n in plans}

    def dense():
        for n in plans:
            fold_sum(sd[n], [(*factors[n], 0.5)], "exact", out=out_dense[n])

    def straight():  # as a packing bank folds a task: every layer in one call
        conv_pack.fold_packed([(p, base_packed[n], out_packed[n], factors[n][0] * 0.5, factors[n][1])
                               for n, p in plans.items()], True)

    def reorder():
        dense()
        return [p.pack(out_dense[n]) for n, p in plans.items()]

    fold = {"dense_ms": _median_ms(dense, args.reps), "packed_ms": _median_ms(straight, args.reps),
            "dense_then_reorder_ms": _median_ms(reorder, args.reps)}
    dense()
    straight()
    fold["max_rel_diff"] = max(float(((out_packed[n].to_dense() - out_dense[n]).abs()
                                      / out_dense[n].abs().clamp_min(1e-30)).max()) for n in plans)

    params = sum(sd[n].numel() for n in plans)
    lines = [f"ResNet-18-like at 64x64: {len(plans)} Conv2d layers packed ({params / 1e6:.1f}M weights), "
             f"{torch.get_num_threads()} torch threads, medians of {args.reps} rounds",
             "forward, each batch on the next of 10 task replicas (weights out of cache)",
             "eager / eager CL: torch eager fed a contiguous / channels-last input; the baseline is the faster "
             "of the two at each batch; packed CL: packed weights, the input channels-last (as the server gives it); "
             "one replica: packed CL on the same replica every time (its weights stay in cache as far as they fit)",
             f"{'batch':>5s} {'eager ms':>9s} {'eager CL ms':>12s} {'packed ms':>10s} {'packed CL ms':>13s} "
             f"{'best eager / packed CL':>23s} {'one replica ms':>15s} {'max |diff|':>11s}"]
    for b, r in forward.items():
        lines.append(f"{b:5d} {r['eager_ms']:9.2f} {r['eager_channels_last_ms']:12.2f} {r['packed_ms']:10.2f} "
                     f"{r['packed_channels_last_ms']:13.2f} {r['best_eager_ms'] / r['packed_channels_last_ms']:22.2f}x "
                     f"{r['packed_channels_last_one_replica_ms']:15.2f} {r['max_abs_diff']:11.1e}")
    if graphs:
        lines += [f"the fused graph (liedeploy.core.conv_graph: {graph.describe()}), the same 10 replicas, "
                  "channels-last input, vs packed CL (the modules)",
                  f"{'batch':>5s} {'packed CL ms':>13s} {'fused graph ms':>15s} {'packed CL / fused graph':>24s} "
                  f"{'max |diff| to eager':>20s}"]
        for b, r in forward.items():
            lines.append(f"{b:5d} {r['packed_channels_last_ms']:13.2f} {r['fused_graph_ms']:15.2f} "
                         f"{r['packed_channels_last_ms'] / r['fused_graph_ms']:23.2f}x {r['fused_graph_max_abs_diff']:20.1e}")
    else:
        lines.append(f"no fused graph here: {why}")
    lines += ["fold of one task's Conv2d weights (rank 16), vs the dense fused fold",
              f"dense fused fold                          {fold['dense_ms']:7.2f} ms   1.00x",
              f"folded straight into the blocked layout   {fold['packed_ms']:7.2f} ms   "
              f"{fold['packed_ms'] / fold['dense_ms']:.2f}x  (max rel. diff to dense {fold['max_rel_diff']:.1e})",
              f"dense fold, then oneDNN's reorder         {fold['dense_then_reorder_ms']:7.2f} ms   "
              f"{fold['dense_then_reorder_ms'] / fold['dense_ms']:.2f}x"]
    name = "conv_pack_cpu" if torch.get_num_threads() == 2 else f"conv_pack_{torch.get_num_threads()}thread_cpu"
    write_results(name, "\n".join(lines), {"forward": forward, "fold": fold, "reps": args.reps,
                                                        "layers": len(plans), "weights": params,
                                                        "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
