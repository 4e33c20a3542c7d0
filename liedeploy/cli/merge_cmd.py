"""``liedeploy merge BASE ADAPTER [ADAPTER ...] -o OUT``: fold adapters into safetensors weights."""

from __future__ import annotations

import json

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="fold adapter files into base weights (streaming, no model code)",
        description="Fold one or more Lie adapter files into a safetensors base (a file or a sharded "
        "*.safetensors.index.json). Exact adapters compose in the Lie algebra: W * exp(sum s_i dW_i). "
        "The output is written to a temporary file and renamed; the base is never modified.",
        epilog="examples:\n  liedeploy merge vit.safetensors cats.safetensors -o vit-cats.safetensors\n"
        "  liedeploy merge model.safetensors.index.json a.safetensors b.safetensors --scale 1 -0.5 "
        "-o out/model.safetensors.index.json --dtype bf16",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE", help="base .safetensors or *.safetensors.index.json")
    p.add_argument("adapters", metavar="ADAPTER", nargs="+", help="adapter .safetensors files")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output file (an index path for a sharded base)")
    p.add_argument("--scale", type=float, nargs="+", metavar="S", help="one scale per adapter (default 1)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="convert floating tensors (default: keep the base's)")
    p.add_argument("--no-verify-base", action="store_true", help="skip the base sha256 check")
    p.add_argument("--allow-mixed-maps", action="store_true", help="allow exact and first_order adapters together")
    p.add_argument("--json", action="store_true", help="print a JSON summary (tensors merged, bytes, seconds)")
    p.set_defaults(run=run, check=check)


def check(args) -> None:
    from liedeploy.cli import UsageError

    if args.scale is not None and len(args.scale) != len(args.adapters):
        raise UsageError(f"got {len(args.scale)} --scale values for {len(args.adapters)} adapters: give one per adapter")


def run(args) -> int:
    from liedeploy.files.file_merge import merge_files

    summary = merge_files(
        args.base,
        args.adapters,
        args.out,
        scales=args.scale,
        dtype=args.dtype,
        verify_base=not args.no_verify_base,
        allow_mixed_maps=args.allow_mixed_maps,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['out']}: merged {summary['tensors_merged']} of {summary['tensors']} tensors from "
            f"{len(summary['merged_from'])} adapter(s), {summary['bytes_written']:,} bytes in {summary['seconds']:.2f} s"
        )
        sp = summary["sparsity"]
        if sp["zeros_base"]:
            print(f"sparsity kept: {sp['zeros_kept']:,} of {sp['zeros_base']:,} zeros of the base "
                  f"({100 * sp['zeros_kept'] / sp['zeros_base']:.1f}%) in the merged tensors"
                  + (f", {sp['zeros_new']:,} new zeros (underflow)" if sp["zeros_new"] else ""))
        if sp["sign_flips"]:
            print(f"signs flipped: {sp['sign_flips']:,} weights (a first_order adapter whose 1 + dW < 0); "
                  "the exact map never flips one")
    return 0
