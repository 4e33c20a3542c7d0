"""Running the app: build the backend, bind the socket, serve with uvicorn, drain on SIGTERM.

SIGTERM (or SIGINT): readiness turns 503 at once, queued and running requests finish (bounded
by ``drain_timeout``), then uvicorn closes and the process exits 0.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from liedeploy.errors import ConfigError, LieError, require

__all__ = ["ServeConfig", "build_backend", "build_state", "serve", "read_admin_token", "default_cache_bytes"]

MAX_TOKEN_BYTES = 4096


@dataclass
class ServeConfig:
    """Everything ``liedeploy serve`` (and the Ray application) needs; all plain values."""

    model: Optional[str] = None  # PKG.MOD:FACTORY
    hf_model: Optional[str] = None  # a transformers causal-LM folder (generation API)
    tokenizer: Optional[str] = None
    tokenizer_object: object = None  # loaded with the model
    max_sequences: int = 8
    max_new_tokens: int = 512
    max_prompt_tokens: int = 2048
    max_kv_bytes: Optional[int] = None  # KV-cache budget of generation; None: max_sequences full-length sequences
    max_batch_tasks: Optional[int] = None  # distinct tasks decoding at once; None: bounded by max_sequences only
    weights: Optional[str] = None
    adapters: Optional[str] = None
    input_shape: Optional[tuple] = None
    inputs: list = field(default_factory=list)  # TensorSpec
    model_kwargs: dict = field(default_factory=dict)
    backend: str = "torch"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_delay_ms: float = 5.0
    max_wait_ms: float = 200.0
    cache_bytes: Optional[int] = None
    cache_policy: str = "frequency"  # which folded tasks stay: the most used ("frequency") or "lru"
    max_queue: int = 1024
    max_body: int = 64 << 20
    admin_token_file: Optional[str] = None
    max_inflight_bytes: Optional[int] = None  # default: 4 x max_body
    max_connections: int = 512
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive: float = 5.0
    request_timeout: float = 60.0
    drain_timeout: float = 30.0
    threads: Optional[int] = None
    workers: int = 1  # threads running batches; with torch on CPU, threads default to cores // workers
    processes: int = 1  # > 1: batches run in that many worker processes (torch on CPU), one batch worker each
    # folded tasks that may wait for a batch; 0: no prefetch thread, workers fold inline;
    # None: 0 for the torch backend on CPU (one compute thread: measured faster), else 4
    fold_ahead: Optional[int] = None
    trt_slots: int = 2

    def input_specs(self) -> list:
        from liedeploy.serving.specs import default_input

        if self.inputs:
            return list(self.inputs)
        if self.hf_model and not self.input_shape:
            from liedeploy.serving.specs import TensorSpec

            return [TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))]
        if self.input_shape:
            return [default_input(self.input_shape)]
        raise ConfigError("say what the model takes: --input-shape 1,3,224,224 or --input NAME:DATATYPE:SHAPE")


def build_backend(cfg: ServeConfig):
    """The backend ``cfg.backend`` names, loaded and ready (refuses in one sentence).

    ``torch``, ``ort`` and ``trt`` are built in (:mod:`liedeploy.serving.backends`); others register a
    factory with :func:`liedeploy.serving.backend.register_backend`.
    """
    from liedeploy.serving.backend import BACKENDS, get_backend_factory

    if cfg.processes > 1:
        from liedeploy.serving.backends.processes import ProcessBackend

        return ProcessBackend(cfg, cfg.processes)
    factory = get_backend_factory(cfg.backend)
    if factory is None:
        raise ConfigError(f"--backend {cfg.backend!r} is not available here; registered: {', '.join(sorted(BACKENDS))}")
    return factory(cfg)


def default_cache_bytes() -> int:
    """The folded-task cache bound when ``--cache-bytes`` is not given: a quarter of the memory
    available at start (``MemAvailable``; 1 GiB where it cannot be read), at least 64 MiB."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    return max(64 << 20, (avail if avail else 4 << 30) // 4)


def _size(n: Optional[int]) -> str:
    if n is None:
        return "unbounded"
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.1f} {unit}"
    return f"{n} B"


def read_admin_token(path: Optional[str]) -> Optional[str]:
    """The admin bearer token in ``path`` (``None`` without a path: admin calls are then refused).

    The one reader for ``liedeploy serve`` and the Ray application. Refuses, in one sentence: a
    path that is not a regular file (a FIFO, a device: never a hang or an endless read), a file
    over 4 KiB, an empty file (an empty token would silently turn admin off).
    """
    if not path:
        return None
    from liedeploy.io.safetensors_header import read_regular

    try:
        token = read_regular(path, MAX_TOKEN_BYTES, "admin token file").decode("utf-8").strip()
    except LieError as exc:
        raise ConfigError(f"cannot read the admin token: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the admin token file is not UTF-8 text") from None
    if not token:
        raise ConfigError(f"{path}: the admin token file is empty")
    return token


def build_state(cfg: ServeConfig, backend=None, replica_id: Optional[str] = None, engine_thread: bool = True,
                compute_thread: bool = False):
    from liedeploy.serving.state import ServingState

    token = read_admin_token(cfg.admin_token_file)
    if cfg.adapters and not os.path.isdir(cfg.adapters):
        raise ConfigError(f"--adapters {cfg.adapters}: not a folder")
    backend = backend or build_backend(cfg)
    state = ServingState(backend, cfg.adapters, admin_token=token,
                         max_body=cfg.max_body, max_inflight_bytes=cfg.max_inflight_bytes, request_timeout=cfg.request_timeout, replica_id=replica_id,
                         batching=dict(max_batch=cfg.max_batch, max_delay=cfg.max_delay_ms / 1000.0,
                                       max_queue=cfg.max_queue, max_wait=cfg.max_wait_ms / 1000.0,
                                       fold_ahead=resolved_fold_ahead(cfg),
                                       workers=max(1, int(cfg.workers), int(cfg.processes)),
                                       **(dict(start_first_worker=False) if compute_thread else {})))
    if cfg.hf_model and backend.kind == "torch":
        from liedeploy.serving.generate import Generator

        state.generator = Generator(backend.bank, cfg.tokenizer_object, max_prompt_tokens=cfg.max_prompt_tokens,
                                    max_new_tokens=cfg.max_new_tokens, max_sequences=cfg.max_sequences,
                                    max_kv_bytes=cfg.max_kv_bytes, observe=state.metrics.observe_generation,
                                    engine_thread=engine_thread, max_batch_tasks=cfg.max_batch_tasks)
    state.scan()
    return state


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolved_threads(cfg: ServeConfig) -> Optional[str]:
    """With several ``--workers`` (or ``--processes``) on a CPU torch backend, give each its share of
    the cores (``--threads`` = cores // workers unless given) and say so; warn where workers x threads
    exceed the cores (GNU OpenMP then stops spin-waiting and every batch waits for sleeping threads)."""
    n = max(int(cfg.workers), int(cfg.processes))
    if n <= 1 or cfg.backend != "torch" or not str(cfg.device).startswith("cpu"):
        return None
    cores = usable_cores()
    given = cfg.threads is not None
    if not given:
        cfg.threads = max(1, cores // n)
    what = (f"{n} worker processes" if cfg.processes > 1 else f"{n} workers")
    note = f"{what} x {cfg.threads} torch thread(s) on {cores} cores"
    if cfg.processes > 1:
        note += f", each with 1/{n} of the cache"
    if given and n * cfg.threads > cores:
        note += " (more threads than cores: batches will wait for each other; --threads 1 or fewer " + \
                ("--processes)" if cfg.processes > 1 else "--workers)")
    return note


def resolved_fold_ahead(cfg: ServeConfig) -> int:
    """``--fold-ahead`` as given, or its default: 0 for the torch backend on CPU, else 4."""
    if cfg.fold_ahead is not None:
        return int(cfg.fold_ahead)
    return 0 if cfg.backend == "torch" and str(cfg.device).startswith("cpu") else 4


def _compute_thread_state(cfg: ServeConfig):
    """Build the state on one compute thread, which then runs the torch work: the decode engine of a
    generating server, else worker 0 of the batcher (folds included with ``--fold-ahead 0``).

    torch on CPU runs its parallel regions on an OpenMP team per calling thread, and GNU OpenMP stops
    spin-waiting once its pooled threads outnumber the cores, so a second thread doing torch work
    (the model load on the main thread, a prefetch thread folding) slows every operation.
    ``benchmarks/bench_threads.py`` measures it on the decode engine; ``bench_serve.py`` compares
    the default with ``--fold-ahead 4`` (a prefetch thread).
    """
    import concurrent.futures as cf

    generating = bool(cfg.hf_model)
    compute = cf.ThreadPoolExecutor(1, thread_name_prefix="liedeploy-compute")
    state = compute.submit(build_state, cfg, None, None, not generating, not generating).result()
    compute.submit(state.generator.engine.run if generating else state.batcher.run_worker)
    return state


def serve(cfg: ServeConfig, log=print) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    uvicorn = require("uvicorn", "serve", "liedeploy serve")
    require("starlette", "serve", "liedeploy serve")
    require("prometheus_client", "serve", "liedeploy serve")
    from liedeploy.serving.app import create_app

    import signal

    early: list = []  # a SIGTERM before uvicorn listens still drains (once it does)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as exc:
        sock.close()
        raise LieError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror})") from None
    t0 = time.monotonic()
    default_cache = cfg.cache_bytes is None and cfg.backend == "torch"
    if default_cache:
        cfg.cache_bytes = default_cache_bytes()
    split = resolved_threads(cfg)
    if cfg.hf_model or (cfg.backend == "torch" and cfg.device == "cpu" and cfg.processes <= 1):
        state = _compute_thread_state(cfg)
    else:
        state = build_state(cfg)
    app = create_app(state)
    sock.listen(2048)  # connections queue from now on, even before the loop accepts them
    port = sock.getsockname()[1]

    class Server(uvicorn.Server):
        # uvicorn routes SIGTERM/SIGINT here; ours drains first and, unlike uvicorn's, does not
        # re-raise the signal after shutdown, so a drained server exits 0
        def handle_exit(self, signum, frame):
            if state.draining:
                self.should_exit = True
                return
            state.draining = True

            def wait():
                deadline = time.monotonic() + cfg.drain_timeout
                while time.monotonic() < deadline and (state.inflight > 0 or not state.batcher.idle):
                    time.sleep(0.01)
                self.should_exit = True

            threading.Thread(target=wait, daemon=True).start()

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if early:
                self.handle_exit(early[0], None)

    from liedeploy.serving.limits import ConnectionLimits, guarded_protocol

    limits = ConnectionLimits(cfg.max_connections, cfg.header_timeout, cfg.body_timeout)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=max(1, int(cfg.drain_timeout)),
                            http=guarded_protocol(limits), timeout_keep_alive=max(1, int(round(cfg.keep_alive))),
                            h11_max_incomplete_event_size=64 << 10)
    server = Server(config)
    refused = ", ".join(f"{t} ({r})" for t, r in state.unavailable.items())
    log(f"liedeploy serve: {len(state.backend.tasks())} task(s) registered"
        + (f", unavailable: {refused}" if refused else "")
        + f"; backend {state.backend.kind}; ready in {time.monotonic() - t0:.1f} s")
    if split:
        log(f"liedeploy serve: {split}")
    if getattr(state.backend, "fold_reason", None):  # worker processes: as their first one said
        log(f"liedeploy serve: folds: {state.backend.fold_reason}")
        log(f"liedeploy serve: conv weights: {state.backend.pack_reason}")
    elif getattr(state.backend, "device", None) is not None and state.backend.kind == "torch":
        from liedeploy.core.fused import fold_path_reason

        path, why = fold_path_reason(state.backend.device)  # builds the CPU kernel now, not at the first fold
        log(f"liedeploy serve: folds: {path} ({why})")
        log(f"liedeploy serve: conv weights: {state.backend.pack_reason}")
    log(f"liedeploy serve: limits: cache {_size(cfg.cache_bytes)}{' (default: a quarter of available memory)' if default_cache else ''}, "
        f"body {_size(cfg.max_body)}, bytes in flight {_size(state.inflight_bytes.limit)}, "
        f"{cfg.max_connections} connections, head/body/keep-alive timeouts {cfg.header_timeout:g}/{cfg.body_timeout:g}/"
        f"{cfg.keep_alive:g} s")
    if state.generator is not None:
        g = state.generator
        if g.engine.mixed:
            from liedeploy.bank.row_dispatch import rows_path
            from liedeploy.serving.kv_cache import model_device

            path, why = rows_path(model_device(g.bank.base))
            log(f"liedeploy serve: mixed decode steps: {path} ({why})")
        log(f"liedeploy serve: generation: {cfg.max_sequences} sequences, KV cache {_size(g.max_kv_bytes)}"
            f"{' (default)' if cfg.max_kv_bytes is None else ''} at {g.kv_per_token} bytes per token, "
            f"prompts up to {g.max_prompt_tokens} tokens, max_tokens up to {g.max_new_tokens}, "
            + (f"at most {cfg.max_batch_tasks} task(s) decoding at once" if cfg.max_batch_tasks
               else f"up to {cfg.max_sequences} tasks decoding at once (--max-batch-tasks), their folded weights held "
                    "beyond --cache-bytes while their rows run"))
    log(f"liedeploy serve: listening on http://{cfg.host}:{port}")
    sys.stdout.flush()
    try:
        server.run(sockets=[sock])
    finally:
        state.batcher.close()
        close = getattr(state.backend, "close", None)
        if close is not None:  # worker processes
            close()
        sock.close()
    log("liedeploy serve: drained and stopped")
    return 0
