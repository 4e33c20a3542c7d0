"""``liedeploy export --onnx|--trt``: build the architecture, load weights strictly, export, verify.

The exporters live in :mod:`liedeploy.exporters` (the repository's ``exporters/`` folder; onnx and
tensorrt imports stay out of the core); this module only parses arguments.
"""

from __future__ import annotations

import argparse
import json

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
        "--input-shape 1,3,224,224 -o tasks/ --task-models a.safetensors b.safetensors\n"
        "  liedeploy export --onnx --hf-model llama/ --adapter poet.safetensors -o poet-onnx/   "
        "# a decoder that generates\n"
        "  liedeploy export --onnx --hf-model llama/ --adapter poet.safetensors --input input_ids:INT64:1,-1 "
        "--input attention_mask:INT64:1,-1 --dynamic-batch -o poet.onnx   # logits\n\n"
        "--model runs code: PKG.MOD is imported and FACTORY called, as `python -c` would. Only name modules you trust.\n"
        "The current folder is searched after installed packages.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--onnx", action="store_true", help="export ONNX, verified in ONNX Runtime (CPU)")
    fmt.add_argument("--trt", action="store_true", help="build a refittable TensorRT engine (needs tensorrt and CUDA)")
    p.add_argument("--model", metavar="PKG.MOD:FACTORY", help="callable that builds the nn.Module")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for FACTORY, as JSON")
    p.add_argument("--weights", metavar="W.safetensors", help="weights (a file or *.safetensors.index.json)")
    p.add_argument("--hf-model", metavar="DIR",
                   help="a transformers folder (config, safetensors weights, tokenizer) instead of --model/--weights; "
                        "without --input: a decoder with KV cache that generates (onnxruntime-genai)")
    p.add_argument("--adapter", metavar="TASK.safetensors", help="merge this task into the model before exporting")
    p.add_argument("--input-shape", metavar="1,3,224,224", help="example input shape (one input)")
    p.add_argument("--input", action="append", default=[], metavar="NAME:DATATYPE:SHAPE",
                   help="a named input passed by keyword, e.g. input_ids:INT64:1,-1 (-1: a dynamic axis; repeat "
                        "for each input); outputs keep the model's names (logits)")
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
    p.add_argument("--quantize", choices=["int8"], help="ONNX Runtime static int8 quantization (QDQ, per-channel weights)")
    p.add_argument("--calibration", metavar="INPUTS.npy", help="calibration inputs for --quantize: a .npy of shape (N, ...)")
    p.add_argument("--refit-targets", nargs="+", metavar="ADAPTER",
                   help="with --trt/--for-trt: only these adapters' targets (and same-shape heads) are refittable; "
                        "default: every weight of rank >= 2")
    p.add_argument("--strip", action="store_true",
                   help="with --trt: a weight-stripped plan, refitted at load from the base file (and an adapter)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="--trt --dynamic-batch: the largest batch the engine takes (default 64; serve's --max-batch "
                        "must not exceed it)")
    p.add_argument("--opt-batch", type=int, metavar="N",
                   help="--trt --dynamic-batch: the batch TensorRT tunes kernels for (default: the example's)")
    p.add_argument("--json", action="store_true", help="print the verification report as JSON")
    p.set_defaults(run=run, check=check)


def parse_shape(text: str, flag: str = "--input-shape") -> tuple:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; a malformed value is a usage error (exit 2)."""
    from liedeploy.cli import UsageError

    try:
        shape = tuple(int(s) for s in str(text).split(","))
        if not shape or any(s < 1 for s in shape):
            raise ValueError
        return shape
    except ValueError:
        raise UsageError(f"{flag} must be positive integers separated by commas, got {text!r}") from None


def check_model_flags(model: str, model_kwargs: str) -> None:
    """``--model`` and ``--model-kwargs`` are well formed (usage errors, before any import)."""
    from liedeploy.files.model_loading import parse_model_spec

    from liedeploy.errors import ConfigError
    from liedeploy.cli import UsageError

    try:
        if model:
            parse_model_spec(model)
        kwargs = json.loads(model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except ValueError:
        raise UsageError(f"--model-kwargs must be a JSON object, got {model_kwargs!r}") from None


def exporter_name(args) -> str:
    """Which registered exporter the flags ask for."""
    if args.hf_model and not (args.input or args.input_shape or args.trt or args.bank or args.task_models
                              or args.for_trt):
        return "onnx-generate"
    if args.trt:
        return "trt"
    if args.bank:
        return "onnx-bank"
    if args.task_models:
        return "onnx-tasks"
    if args.for_trt:
        return "onnx-refit"
    return "onnx"


def _request(args):
    from liedeploy.exporters.registry import ExportRequest

    return ExportRequest(out=args.out, opset=args.opset, dynamic_batch=args.dynamic_batch, fp16=args.fp16,
                         atol=args.atol, rtol=args.rtol, adapters=list(args.bank or args.task_models or []),
                         options={"strip": args.strip, "refit_adapters": list(args.refit_targets or []),
                                  "quantize": args.quantize, "calibration": args.calibration,
                                  "max_batch": args.max_batch, "opt_batch": args.opt_batch,
                                  "hf_model": args.hf_model, "adapter": args.adapter})


def check(args) -> None:
    """Usage errors, found before any model is built (exit 2)."""
    from liedeploy.exporters.registry import get_exporter

    from liedeploy.errors import ConfigError
    from liedeploy.cli import UsageError

    if args.bank and args.task_models:
        raise UsageError("--bank and --task-models are two ways to export tasks: choose one")
    _check_model_source(args)
    if args.trt and (args.bank or args.task_models):
        raise UsageError("--trt builds one engine; tasks are switched into it by refit, so --bank/--task-models do not apply")
    if args.for_trt and (args.bank or args.task_models):
        raise UsageError("--for-trt writes one refit-ready graph; it cannot be combined with --bank or --task-models")
    if args.for_trt and args.trt:
        raise UsageError("--for-trt goes with --onnx (the graph for trtexec); --trt builds the engine itself")
    if args.strip and not args.trt:
        raise UsageError("--strip applies to --trt engines only")
    if args.quantize and not args.calibration:
        raise UsageError("--quantize int8 needs --calibration INPUTS.npy (real inputs, shape (N, ...))")
    if args.calibration and not args.quantize:
        raise UsageError("--calibration goes with --quantize int8")
    if args.quantize and (args.fp16 or args.trt or args.for_trt or args.bank):
        raise UsageError("--quantize int8 applies to --onnx exports (one model or --task-models), not with "
                         "--fp16, --trt, --for-trt or --bank")
    if args.refit_targets and not (args.trt or args.for_trt):
        raise UsageError("--refit-targets applies to --trt and --onnx --for-trt")
    if (args.max_batch is not None or args.opt_batch is not None) and not args.trt:
        raise UsageError("--max-batch and --opt-batch set a TensorRT engine's batch range: they apply to --trt")
    if args.trt:
        from liedeploy.exporters.tensorrt import batch_profile

        try:
            batch_profile(_example_batch(args), args.dynamic_batch, args.max_batch, args.opt_batch)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    if not 7 <= args.opset <= 23:
        raise UsageError(f"--opset must be between 7 and 23 (TensorRT's parser accepts <= 20), got {args.opset}")
    for flag, v in (("--atol", args.atol), ("--rtol", args.rtol)):
        if v is not None and not (v >= 0 and v != float("inf")):
            raise UsageError(f"{flag} must be a finite number >= 0, got {v}")
    check_model_flags(args.model, args.model_kwargs)
    try:
        get_exporter(exporter_name(args)).check(_request(args))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _check_model_source(args) -> None:
    """Where the model comes from and what it takes: usage errors (exit 2) before anything is built."""
    from liedeploy.cli import UsageError

    if args.hf_model and (args.model or args.weights):
        raise UsageError("--hf-model replaces --model and --weights: give one or the other")
    if not args.hf_model and not (args.model and args.weights):
        raise UsageError("say which model: --model PKG.MOD:FACTORY with --weights W.safetensors, or --hf-model DIR")
    if args.input_shape and args.input:
        raise UsageError("give either --input-shape (one FP32 input) or --input NAME:DATATYPE:SHAPE, not both")
    if args.adapter and (args.bank or args.task_models):
        raise UsageError("--adapter merges one task before a single export; --bank/--task-models take their tasks "
                         "themselves")
    if exporter_name(args) == "onnx-generate":
        return
    if not (args.input_shape or args.input):
        raise UsageError("say what the model takes: --input-shape 1,3,224,224 or --input NAME:DATATYPE:SHAPE"
                         + (" (or neither, with --hf-model, for a decoder that generates)" if args.hf_model else ""))
    if args.input and args.quantize:
        raise UsageError("--quantize int8 takes one input (--input-shape): its calibration file is one array")
    if args.input and (args.trt or args.for_trt or args.bank or args.task_models):
        raise UsageError("--input (named inputs) applies to the --onnx export of one model; use --input-shape "
                         "with --trt, --for-trt, --bank and --task-models")
    if args.input_shape:
        parse_shape(args.input_shape)
    for text in args.input:
        parse_export_input(text)


def parse_export_input(text: str) -> tuple:
    """``"input_ids:INT64:1,-1"`` -> ``("input_ids", torch dtype, (1, -1))``; -1 marks a dynamic axis."""
    from liedeploy.cli import UsageError
    from liedeploy.errors import ConfigError
    from liedeploy.serving.specs import parse_input_flag

    try:
        spec = parse_input_flag(text)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    shape = tuple(int(s) for s in text.split(":")[2].split(","))
    return spec.name, spec.datatype, shape


def _example_batch(args) -> int:
    if args.input:
        b = parse_export_input(args.input[0])[2][0]
        return 1 if b == -1 else b
    return parse_shape(args.input_shape)[0]


def _named_examples(args, model) -> tuple:
    """Example tensors of the ``--input`` flags, their names and dynamic axes.

    A -1 axis is dynamic (example size 8, or 1 for the batch axis); ``--dynamic-batch`` makes
    axis 0 dynamic too. Integer inputs get token ids below the model's vocabulary, or ones where the
    name says mask; float inputs random normals.
    """
    import numpy as np
    import torch

    from liedeploy.serving.specs import DATATYPES

    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    g = torch.Generator().manual_seed(0)
    names, tensors, axes = [], [], []
    for text in args.input:
        name, datatype, shape = parse_export_input(text)
        dyn = tuple(i for i, s in enumerate(shape) if s == -1 or (i == 0 and args.dynamic_batch))
        size = tuple((1 if i == 0 else 8) if s == -1 else s for i, s in enumerate(shape))
        dtype = torch.from_numpy(np.zeros(1, DATATYPES[datatype])).dtype
        if dtype.is_floating_point:
            t = torch.randn(size, generator=g).to(dtype)
        elif "mask" in name.lower():
            t = torch.ones(size, dtype=dtype)
        elif "type" in name.lower() or dtype == torch.bool:
            t = torch.zeros(size, dtype=dtype)
        else:
            t = torch.randint(0, vocab, size, generator=g).to(dtype)
        names.append(name)
        tensors.append(t)
        axes.append(dyn)
    return tuple(tensors), names, axes


def _build(args):
    """The model the flags name, with ``--adapter`` loaded (the exporters merge live adapters)."""
    from liedeploy.files.model_loading import build_model, load_hf_architecture

    if args.hf_model:
        model = load_hf_architecture(args.hf_model)
    else:
        model = build_model(args.model, json.loads(args.model_kwargs), args.weights)
    if args.adapter:
        from liedeploy import load_adapter

        model = load_adapter(model, args.adapter)
    return model


def run(args) -> int:
    import torch

    from liedeploy.exporters.registry import get_exporter

    exporter = get_exporter(exporter_name(args))
    req = _request(args)
    if not exporter.builds_model:
        exporter.prepare(req)
        report = exporter.export(req)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary)
        return 0
    if args.input_shape:
        shape = parse_shape(args.input_shape)
        if args.input_dtype == "int64":
            example = torch.zeros(shape, dtype=torch.int64)
        else:
            example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        req.example_inputs = (example,)
    exporter.prepare(req)  # a missing stack, the calibration file, the output folder: before the model is built
    req.model = _build(args)
    if args.input:
        req.example_inputs, names, axes = _named_examples(args, req.model)
        req.options.update(input_names=names, dynamic_axes=axes, by_name=True)
    report = exporter.export(req)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary)
    return 0
