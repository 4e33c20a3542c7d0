"""``liedeploy export --onnx|--trt``: build the architecture, load weights strictly, export, verify.

The exporters live in the top-level ``exporters`` package (onnx/tensorrt imports stay out of the
core); this module only parses arguments.
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export merged weights to ONNX (checked in ONNX Runtime) or a TensorRT engine",
        description="Build the model with FACTORY, load --weights strictly (e.g. the output of "
        "'liedeploy merge'), export it and check the export against torch before keeping it.",
        epilog="examples:\n"
        "  liedeploy export --onnx --model mypkg.models:resnet18 --weights merged.safetensors "
        "--input-shape 1,3,224,224 -o model.onnx --dynamic-batch\n"
        "  liedeploy export --onnx --model mypkg.models:resnet18 --weights base.safetensors "
        "--input-shape 1,3,224,224 -o bank.onnx --bank a.safetensors b.safetensors\n"
        "  liedeploy export --onnx --model mypkg.models:resnet18 --weights base.safetensors "
        "--input-shape 1,3,224,224 -o tasks/ --task-models a.safetensors b.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--onnx", action="store_true", help="export ONNX, verified in ONNX Runtime (CPU)")
    fmt.add_argument("--trt", action="store_true", help="build a refittable TensorRT engine (needs tensorrt and CUDA)")
    p.add_argument("--model", required=True, metavar="PKG.MOD:FACTORY", help="callable that builds the nn.Module")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for FACTORY, as JSON")
    p.add_argument("--weights", required=True, metavar="W.safetensors", help="weights (a file or *.safetensors.index.json)")
    p.add_argument("--input-shape", required=True, metavar="1,3,224,224", help="example input shape")
    p.add_argument("--input-dtype", default="float32", choices=["float32", "int64"], help="example input dtype")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output .onnx (or .engine for --trt)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis dynamic")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; TensorRT accepts <= 20)")
    p.add_argument("--fp16", action="store_true", help="export in float16")
    p.add_argument("--atol", type=float, help="absolute tolerance of the check (default by dtype)")
    p.add_argument("--rtol", type=float, help="relative tolerance of the check (default by dtype)")
    p.add_argument("--bank", nargs="+", metavar="ADAPTER",
                   help="write a switchable bank graph at OUT plus one .onnx_adapter per adapter (ONNX Runtime >= 1.20)")
    p.add_argument("--task-models", nargs="+", metavar="ADAPTER",
                   help="write base.onnx and one merged <task>.onnx per adapter into the folder OUT, sharing unchanged weights on disk")
    p.add_argument("--for-trt", action="store_true",
                   help="with --onnx: keep initializers named as in state_dict and write OUT.refit.json (for trtexec --refit)")
    p.add_argument("--json", action="store_true", help="print the verification report as JSON")
    p.set_defaults(run=run)


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.split(","))
        if not shape or any(s < 1 for s in shape):
            raise ValueError
        return shape
    except ValueError:
        raise ValueError(f"--input-shape must be positive integers separated by commas, got {text!r}") from None


def run(args) -> int:
    import torch

    from exporters.model_loading import build_model

    try:
        kwargs = json.loads(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}") from None
    shape = _shape(args.input_shape)
    if args.trt:
        from exporters.tensorrt import require_tensorrt

        require_tensorrt()  # refuse before building anything when TensorRT or CUDA is missing
    model = build_model(args.model, kwargs, args.weights)
    if args.input_dtype == "int64":
        example = torch.zeros(shape, dtype=torch.int64)
    else:
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    common = dict(opset=args.opset, dynamic_batch=args.dynamic_batch, atol=args.atol, rtol=args.rtol)
    if args.bank and args.task_models:
        raise ValueError("--bank and --task-models are two ways to export tasks: choose one")
    if args.bank or args.task_models:
        if args.fp16:
            raise ValueError("--fp16 applies to a single merged export only")
        if args.bank:
            from exporters.bank_graph import export_bank_graph

            report = export_bank_graph(model, example, args.out, args.bank, **common)
        else:
            from exporters.task_models import export_task_models

            report = export_task_models(model, example, args.out, args.task_models, **common)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            where = os.path.dirname(os.path.abspath(args.out)) if args.bank else args.out
            print(f"{args.out}: exported and checked in ONNX Runtime, base and {len(args.bank or args.task_models)} "
                  f"task(s); files in {where}")
        return 0
    if args.trt or args.for_trt:
        from exporters.tensorrt import export_refit_onnx, export_tensorrt

        if args.trt:
            report = export_tensorrt(model, example, args.out, opset=args.opset, dynamic_batch=args.dynamic_batch,
                                     fp16=args.fp16)
        else:
            report = export_refit_onnx(model, example, args.out, fp16=args.fp16, **common)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"{args.out}: exported; refit manifest in {report['refit_manifest']}")
        return 0
    from exporters.onnx import export_onnx

    report = export_onnx(model, example, args.out, fp16=args.fp16, **common)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        worst = max((o.get("max_abs", 0.0) for c in report.get("checks", []) for o in c["outputs"]), default=0.0)
        print(f"{args.out}: exported and checked in ONNX Runtime (max abs error {worst:.3g}); report in {args.out}.report.json")
    return 0
