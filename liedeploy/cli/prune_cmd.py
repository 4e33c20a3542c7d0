"""``liedeploy prune``: magnitude pruning (unstructured or N:M) of a safetensors base, streaming."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run", "check"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="magnitude-prune a safetensors base (unstructured or N:M such as 2:4), streaming and atomic",
        description="Set the smallest-magnitude weights of every floating tensor of rank >= 2 (or those --targets "
        "matches) to zero: --sparsity S per tensor, or --pattern N:M along the reduction axis (2:4 for sparse "
        "tensor cores). Lie adapters trained on the pruned base keep every zero in every merged task.",
        epilog="examples:\n  liedeploy prune base.safetensors -o base-50.safetensors --sparsity 0.5\n"
        "  liedeploy prune base.safetensors -o base-24.safetensors --pattern 2:4 --targets '.*(conv|fc).*weight'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE", help="base .safetensors or *.safetensors.index.json")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output file (an index path for a sharded base)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sparsity", type=float, metavar="S", help="fraction in (0, 1) of each tensor set to zero")
    g.add_argument("--pattern", metavar="N:M", help="N zeros in every M consecutive weights (e.g. 2:4)")
    p.add_argument("--targets", metavar="REGEX", help="tensors to prune (default: every floating tensor of rank >= 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run, check=check)


def check(args) -> None:
    import re

    from liedeploy.files.prune import parse_pattern
    from liedeploy.cli import UsageError

    if args.sparsity is not None and not 0 < args.sparsity < 1:
        raise UsageError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.pattern is not None:
        try:
            parse_pattern(args.pattern)
        except Exception as exc:  # noqa: BLE001 - ConfigError
            raise UsageError(str(exc)) from None
    if args.targets is not None:
        try:
            re.compile(args.targets)
        except re.error as exc:
            raise UsageError(f"--targets {args.targets!r} is not a valid regex: {exc}") from None


def run(args) -> int:
    from liedeploy.files.prune import prune_files

    rep = prune_files(args.base, args.out, sparsity=args.sparsity, pattern=args.pattern, targets=args.targets)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"{args.out}: {rep['method']}, {rep['pruned_tensors']} tensor(s) pruned, total sparsity "
          f"{100 * rep['total_sparsity']:.1f}% in {rep['seconds']:.2f} s")
    for name, t in sorted(rep["tensors"].items()):
        print(f"  {name:60s} {100 * t['sparsity']:5.1f}%  2:4 {'yes' if t['2:4'] else 'no'}")
    for name, why in sorted(rep["skipped"].items()):
        print(f"  {name:60s} skipped: {why}")
    return 0
