"""``liedeploy serve``: the Open Inference Protocol v2 over HTTP for many tasks on one base model."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run", "check", "parse_size"]



def parse_size(text: str, flag: str) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1000000"`` -> bytes; a malformed size is a usage error."""
    from liedeploy.cli import UsageError
    from liedeploy.serving.specs import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(f"{flag} {exc}") from None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve many tasks over HTTP (KServe Open Inference Protocol v2, tritonclient works as is)",
        description="Serve the base model and one model per adapter file in --adapters DIR (task = file stem) over "
        "HTTP with the Open Inference Protocol v2, dynamic batching grouped by task and a byte-bounded cache of "
        "folded tasks. Binds 127.0.0.1 unless --host says otherwise. SIGTERM drains: readiness 503, queued "
        "requests finish, exit 0. Needs: pip install 'liedeploy[serve]'.",
        epilog="examples:\n"
        "  liedeploy serve --model mypkg.models:resnet18 --weights base.safetensors --adapters tasks/ "
        "--input-shape 1,3,224,224 --cache-bytes 2GB\n"
        "  liedeploy serve --model mypkg.models:bert --weights base.safetensors --adapters tasks/ "
        "--input input_ids:INT64:-1,128 --input attention_mask:INT64:-1,128\n"
        "  liedeploy serve --backend ort --adapters exported_tasks/ --port 9000\n"
        "  liedeploy serve --hf-model my_llm/ --adapters tasks/   # + OpenAI /v1/completions, /v1/chat/completions\n\n"
        "--model runs code: PKG.MOD is imported and FACTORY called. Only name modules you trust.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="PKG.MOD:FACTORY", help="callable that builds the base nn.Module (torch, trt)")
    p.add_argument("--hf-model", metavar="DIR",
                   help="a transformers causal-LM folder (config, safetensors weights, tokenizer) instead of "
                        "--model/--weights: adds the OpenAI and KServe generate APIs")
    p.add_argument("--tokenizer", metavar="DIR", help="--hf-model: the tokenizer's folder (default: the model's)")
    p.add_argument("--max-sequences", type=int, default=8, help="--hf-model: sequences generating at once (503 beyond)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="--hf-model: the largest max_tokens (400 beyond)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="--hf-model: the longest prompt (400 beyond)")
    p.add_argument("--max-kv-bytes", metavar="SIZE",
                   help="--hf-model: KV-cache budget (e.g. 2G), reserved per sequence for its prompt + max_tokens "
                        "(503 with Retry-After beyond; default: --max-sequences sequences of full length)")
    p.add_argument("--max-batch-tasks", type=int, metavar="N",
                   help="--hf-model: distinct tasks decoding at once; their folded weights are held while their rows "
                        "run, beyond --cache-bytes, so this bounds that memory; other tasks' requests wait "
                        "(default: bounded by --max-sequences only)")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="keyword arguments for FACTORY, as JSON")
    p.add_argument("--weights", metavar="BASE.safetensors", help="base weights (a file or *.safetensors.index.json)")
    p.add_argument("--adapters", metavar="DIR", help="folder of task files: DIR/{task}.safetensors (ort: the export folder)")
    p.add_argument("--input-shape", metavar="1,3,224,224", help="one FP32 input of this shape (batch axis free)")
    p.add_argument("--input", action="append", default=[], metavar="NAME:DATATYPE:SHAPE",
                   help="a named input, e.g. input_ids:INT64:-1,128 (repeat for each; passed by name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--backend", choices=["torch", "ort", "trt"], default="torch")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch backend)")
    p.add_argument("--max-batch", type=int, default=8, help="most samples coalesced into one batch of a task")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-wait-ms", type=float, default=200.0,
                   help="a request older than this is served first, folded task or not (the fairness bound)")
    p.add_argument("--cache-bytes", metavar="SIZE",
                   help="memory for folded tasks, e.g. 2GB (default: a quarter of the memory available at start)")
    p.add_argument("--cache-policy", choices=["frequency", "lru"], default="frequency",
                   help="which folded tasks stay in --cache-bytes: the most used, counted with decay, a rare task "
                        "served once rather than evict a popular one (default), or the most recently used")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting before new ones get 503")
    p.add_argument("--max-body", default="64MiB", metavar="SIZE", help="largest request body (413 beyond)")
    p.add_argument("--admin-token-file", metavar="FILE", help="bearer token for the model repository (load/unload)")
    p.add_argument("--max-inflight-bytes", metavar="SIZE",
                   help="request bytes read or decoded at once before new ones get 503 (default: 4 x --max-body)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections; beyond, the oldest idle or slow one is closed (default 512)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's head (default 10)")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send a request's body (default 60)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle connection is kept between requests (default 5)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a request is answered 503")
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime intra-op threads (default: the cores, "
                   "divided among --workers)")
    p.add_argument("--workers", type=int, default=1,
                   help="threads running batches, each a whole batch at a time (default 1). With the torch backend on "
                        "CPU keep workers x --threads = the cores: on 2 cores, --workers 2 (1 thread each) measured "
                        "1.05-1.16x the requests/s at 10 uniform tasks and 0.91-0.95x at 1 task (smaller batches; "
                        "benchmarks/bench_workers.py)")
    p.add_argument("--processes", type=int, default=1,
                   help="torch backend on CPU: run batches in N worker processes (each its own GIL, cores / N torch "
                        "threads and 1/N of --cache-bytes; a task keeps to the process that folded it). Costs the "
                        "runtime and the model once more per process (default 1: batches on this process's "
                        "compute thread)")
    p.add_argument("--fold-ahead", type=int, default=None,
                   help="cold tasks folded by a prefetch thread beside the batches, that may wait for their batch "
                        "(0: no prefetch thread, folds and batches share the compute thread; default 0 for the torch "
                        "backend on CPU, where that measured faster, else 4)")
    p.add_argument("--trt-slots", type=int, default=2, help="--backend trt: engines on the GPU, each refitted to one task")
    p.set_defaults(run=run, check=check)


def check(args) -> None:
    from liedeploy.errors import ConfigError
    from liedeploy.cli import UsageError
    from liedeploy.cli.export_cmd import check_model_flags, parse_shape

    for flag, v, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1), ("--port", args.port, 0),
                        ("--trt-slots", args.trt_slots, 1), ("--fold-ahead", 0 if args.fold_ahead is None else args.fold_ahead, 0),
                        ("--workers", args.workers, 1), ("--processes", args.processes, 1)):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if args.port > 65535:
        raise UsageError(f"--port must be <= 65535, got {args.port}")
    for flag, v in (("--max-delay-ms", args.max_delay_ms), ("--max-wait-ms", args.max_wait_ms),
                    ("--request-timeout", args.request_timeout)):
        if not v >= 0:
            raise UsageError(f"{flag} must be >= 0, got {v}")
    for flag, v in (("--max-connections", args.max_connections), ("--header-timeout", args.header_timeout),
                    ("--body-timeout", args.body_timeout), ("--keep-alive-timeout", args.keep_alive_timeout)):
        if not v > 0:
            raise UsageError(f"{flag} must be > 0, got {v}")
    if args.max_inflight_bytes is not None:
        parse_size(args.max_inflight_bytes, "--max-inflight-bytes")
    if args.input_shape and args.input:
        raise UsageError("give either --input-shape (one FP32 input) or --input NAME:DATATYPE:SHAPE, not both")
    if args.hf_model and (args.model or args.weights or args.backend != "torch"):
        raise UsageError("--hf-model replaces --model and --weights, with the torch backend")
    for flag, v in (("--max-sequences", args.max_sequences), ("--max-new-tokens", args.max_new_tokens),
                    ("--max-prompt-tokens", args.max_prompt_tokens),
                    ("--max-batch-tasks", 1 if args.max_batch_tasks is None else args.max_batch_tasks)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.backend in ("torch", "trt") and not args.hf_model:
        if not args.model or not args.weights:
            raise UsageError(f"--backend {args.backend} needs --model PKG.MOD:FACTORY and --weights BASE.safetensors")
        if not args.input_shape and not args.input:
            raise UsageError("say what the model takes: --input-shape 1,3,224,224 or --input NAME:DATATYPE:SHAPE")
    if args.processes > 1:
        from liedeploy.serving.backends.processes import unsupported

        why = unsupported(args)
        if why:
            raise UsageError(why)
        if args.workers > 1:
            raise UsageError("give --processes N (one batch worker per process) or --workers N (threads), not both")
        if args.fold_ahead:
            raise UsageError("--fold-ahead needs one process: worker processes fold their tasks themselves")
    if args.backend == "ort" and not args.adapters:
        raise UsageError("--backend ort needs --adapters DIR (the folder 'liedeploy export --onnx --task-models/--bank' wrote)")
    if args.input_shape:
        parse_shape(args.input_shape)
    try:
        from liedeploy.serving.specs import parse_input_flag

        [parse_input_flag(i) for i in args.input]
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    check_model_flags(args.model, args.model_kwargs)
    if args.cache_bytes is not None:
        parse_size(args.cache_bytes, "--cache-bytes")
    if args.max_kv_bytes is not None:
        if not args.hf_model:
            raise UsageError("--max-kv-bytes bounds text generation: it needs --hf-model")
        parse_size(args.max_kv_bytes, "--max-kv-bytes")
    parse_size(args.max_body, "--max-body")


def run(args) -> int:
    from liedeploy.serving.server import ServeConfig, serve
    from liedeploy.serving.specs import parse_input_flag
    from liedeploy.cli.export_cmd import parse_shape

    cfg = ServeConfig(
        model=args.model, weights=args.weights, adapters=args.adapters,
        input_shape=parse_shape(args.input_shape) if args.input_shape else None,
        inputs=[parse_input_flag(i) for i in args.input], model_kwargs=json.loads(args.model_kwargs),
        backend=args.backend, device=args.device, host=args.host, port=args.port, max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms, max_wait_ms=args.max_wait_ms,
        cache_bytes=parse_size(args.cache_bytes, "--cache-bytes") if args.cache_bytes is not None else None,
        cache_policy=args.cache_policy, max_queue=args.max_queue, max_body=parse_size(args.max_body, "--max-body"),
        admin_token_file=args.admin_token_file, request_timeout=args.request_timeout, threads=args.threads,
        trt_slots=args.trt_slots, fold_ahead=args.fold_ahead, workers=args.workers, processes=args.processes, hf_model=args.hf_model, tokenizer=args.tokenizer,
        max_sequences=args.max_sequences, max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
        max_batch_tasks=args.max_batch_tasks,
        max_kv_bytes=parse_size(args.max_kv_bytes, "--max-kv-bytes") if args.max_kv_bytes is not None else None,
        max_connections=args.max_connections, header_timeout=args.header_timeout,
        body_timeout=args.body_timeout, keep_alive=args.keep_alive_timeout,
        max_inflight_bytes=(parse_size(args.max_inflight_bytes, "--max-inflight-bytes")
                            if args.max_inflight_bytes is not None else None),
    )
    return serve(cfg, log=lambda s: print(s, flush=True))
