"""``liedeploy demo``: the main job on embedded data, end to end."""

from __future__ import annotations

import json
import os


__all__ = ["add_parser", "run", "TASK_NAMES"]

# the demo's tasks (liedeploy.demo.TASKS; a test keeps the two equal), listed here so that
# `liedeploy --help` does not import torch
TASK_NAMES = ("rotated", "inverted", "mirrored", "blurred", "parity")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train, save, merge (and export) Lie adapters for several digit tasks, on embedded data",
        description="Pretrain a small convnet on scikit-learn's bundled digits, train one Lie adapter per "
        "task (rotated, inverted, mirrored, blurred digits), save the adapter files, merge them and report "
        "per-task accuracy. No download.",
        epilog="example: liedeploy demo --out /tmp/demo --json",
    )
    p.add_argument("--out", default="liedeploy-demo", help="output folder (default: ./liedeploy-demo)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASK_NAMES), help="tasks to run (default: all)")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--adapter-epochs", type=int, default=25)
    p.add_argument("-r", "--rank", type=int, default=4)
    p.add_argument("--expmap", choices=["exact", "first_order"], default="exact")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compressed", action="store_true",
                   help="skip the compressed track (pruned bases, int8 task models)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.set_defaults(run=run)


def run(args) -> int:
    from liedeploy.demo.pipeline import run_demo

    summary = run_demo(
        args.out,
        tasks=args.tasks,
        pretrain_epochs=args.pretrain_epochs,
        adapter_epochs=args.adapter_epochs,
        r=args.rank,
        expmap=args.expmap,
        seed=args.seed,
        log=(lambda s: None) if args.json else print,
    )
    log = (lambda s: None) if args.json else print
    try:
        import onnxruntime  # noqa: F401

        from liedeploy.cli.demo_onnx import run_demo_onnx
    except ImportError:
        log("(ONNX step skipped: pip install 'liedeploy[demo]' to export and check the task models in ONNX Runtime)")
    else:
        run_demo_onnx(summary, args.out, seed=args.seed, log=log)
        if not args.no_compressed:
            from liedeploy.cli.demo_compress import run_demo_compressed

            summary["compressed"] = run_demo_compressed(summary, args.out, epochs=max(1, args.adapter_epochs * 3 // 5),
                                                        r=args.rank, seed=args.seed, log=log)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    try:
        import tritonclient.http  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        log("(serving step skipped: pip install 'liedeploy[demo]' to serve the tasks over HTTP and query them)")
    else:
        from liedeploy.demo.serving_step import run_demo_serve

        summary["serve"] = run_demo_serve(summary, args.out, seed=args.seed, log=log)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0
