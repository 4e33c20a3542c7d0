"""Start-up time of each ``liedeploy`` subcommand, now vs an earlier commit (before the lazy imports).

    python benchmarks/bench_startup.py --before 8faa955 --reps 7

For each command line, the median wall time of ``python -m liedeploy.cli ...`` over ``--reps``
runs, for the working tree and for ``--before`` (checked out into a temporary git worktree and
put first on PYTHONPATH). Prints the table of ratios (now / before) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = [["--version"], ["--help"], ["merge", "--help"], ["export", "--help"], ["inspect", "--help"],
            ["demo", "--help"], ["inspect", "{adapter}"], ["inspect", "{base}"]]


def _files(folder: str) -> dict:
    code = (
        "import torch, sys\n"
        "from liedeploy import LieConfig, apply_adapters_, save_adapter\n"
        "from safetensors.torch import save_file\n"
        "m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 10))\n"
        f"save_file(m.state_dict(), {os.path.join(folder, 'base.safetensors')!r})\n"
        "apply_adapters_(m, LieConfig(r=4, targets=['0', '1']))\n"
        f"save_adapter(m, {os.path.join(folder, 'a.safetensors')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return {"adapter": os.path.join(folder, "a.safetensors"), "base": os.path.join(folder, "base.safetensors")}


def _time(argv, pythonpath: str, reps: int) -> float:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; from liedeploy.cli import main; sys.exit(main())", *argv],
                       env=env, capture_output=True, check=False, cwd=os.path.dirname(pythonpath))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="8faa955", help="git ref to compare against")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "startup_cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = _files(tmp)
        wt = os.path.join(tmp, "before")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", wt, args.before], check=True,
                       capture_output=True)
        try:
            rows = []
            for cmd in COMMANDS:
                argv = [c.format(**files) for c in cmd]
                now = _time(argv, ROOT, args.reps)
                before = _time(argv, wt, args.reps)
                rows.append({"command": "liedeploy " + " ".join(cmd), "now_s": now, "before_s": before,
                             "ratio": now / before})
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", wt], check=False, capture_output=True)
    print(f"start-up, median of {args.reps} runs; ratio = now / before ({args.before})")
    print(f"{'command':40s} {'now s':>8s} {'before s':>9s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['command']:40s} {r['now_s']:8.3f} {r['before_s']:9.3f} {r['ratio']:7.2f}x")
    with open(args.out, "w") as f:
        json.dump({"reps": args.reps, "before": args.before, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
