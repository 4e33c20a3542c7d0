"""``liedeploy convert``: PEFT HiRA adapters to and from Lie first_order adapter files."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run", "check"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert PEFT HiRA adapters to Lie first_order adapter files and back",
        description="PEFT's HiRA (W + W * BA) is the Lie first_order map: --from-peft turns a HiRA adapter folder "
        "(adapter_config.json + adapter_model.safetensors) into an adapter file for BASE; --to-peft writes a "
        "first_order adapter file as a folder PeftModel.from_pretrained loads. The exact map has no PEFT layer.",
        epilog="examples:\n"
        "  liedeploy convert --from-peft hira_dir/ --base base.safetensors -o task.safetensors\n"
        "  liedeploy convert --to-peft task.safetensors -o hira_dir/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-peft", metavar="PEFT_DIR", help="a PEFT HiRA adapter folder")
    g.add_argument("--to-peft", metavar="ADAPTER", help="a first_order adapter file")
    p.add_argument("--base", metavar="BASE.safetensors", help="with --from-peft: the base weights (shapes, sha256)")
    p.add_argument("-o", "--out", required=True, help="the adapter file (--from-peft) or PEFT folder (--to-peft)")
    p.add_argument("--name", help="task name stored in the file (--from-peft; default: the folder name)")
    p.add_argument("--task-type", help="--to-peft: PEFT's task_type (SEQ_CLS, CAUSAL_LM...; default: what "
                                        "--from-peft recorded)")
    p.add_argument("--base-model", metavar="NAME_OR_PATH",
                   help="--to-peft: base_model_name_or_path, what AutoPeftModel loads the base from")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(run=run, check=check)


def check(args) -> None:
    from liedeploy.cli import UsageError

    if args.from_peft and not args.base:
        raise UsageError("--from-peft needs --base BASE.safetensors (the weights the adapter was trained on)")
    if args.to_peft and (args.base or args.name):
        raise UsageError("--base and --name apply to --from-peft only")
    if args.from_peft and (args.task_type or args.base_model):
        raise UsageError("--task-type and --base-model apply to --to-peft only")


def run(args) -> int:
    from liedeploy.files.peft_convert import from_peft, to_peft

    if args.from_peft:
        summary = from_peft(args.from_peft, args.base, args.out, name=args.name)
        text = (f"{args.out}: {len(summary['targets'])} target(s) and {len(summary['full'])} full tensor(s) from the "
                f"PEFT HiRA adapter {args.from_peft} (first_order)")
    else:
        summary = to_peft(args.to_peft, args.out, task_type=args.task_type, base_model_name_or_path=args.base_model)
        text = f"{args.out}: PEFT HiRA adapter with {len(summary['targets'])} target module(s), r={summary['r']}"
    print(json.dumps(summary, indent=2) if args.json else text)
    return 0
