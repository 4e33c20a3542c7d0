"""``liedeploy serve`` as a Ray Serve application: the same HTTP app, tasks multiplexed over replicas.

    serve run liedeploy.serving.ray:build_app model=PKG.MOD:FACTORY weights=BASE adapters=DIR \\
        input_shape=1,3,224,224 num_replicas=2 max_tasks_per_replica=8

Two deployments:

- ``Ingress`` (the HTTP route): the very app of ``liedeploy serve`` (:func:`~.app.create_app`,
  same paths, codes, batcher, metrics, repository extension), whose backend
  (:class:`RayRoutedBackend`) sends each batch of one task to the replica deployment with
  ``multiplexed_model_id=task``;
- ``TaskReplica``: a torch backend per replica; ``@serve.multiplexed`` keeps up to
  ``max_tasks_per_replica`` tasks folded (LRU, on top of the bank's own byte budget), and Ray
  routes a task's requests to a replica that already holds it.

A replica that dies mid-request is restarted by Ray; the ingress retries the batch (another
replica, or the restarted one) and, if that fails too, answers 503 with Retry-After: never a
wrong answer, never a hang past ``request_timeout``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Optional

from liedeploy.errors import ConfigError, LieError, require

__all__ = ["build_app", "RayRoutedBackend", "parse_args", "ingress_state", "fit_replicas", "REPLICA_KEY"]

from liedeploy.serving.app import REPLICA_KEY  # noqa: E402  (a backend output that names the replica, sent as a header)
from liedeploy.serving.state import task_file  # noqa: E402
_STATS_KEY = "__liedeploy_stats__"

_INT = ("num_replicas", "max_tasks_per_replica", "max_batch", "max_queue", "min_replicas", "max_replicas", "threads",
        "max_ongoing_requests")
_FLOAT = ("max_delay_ms", "max_wait_ms", "request_timeout", "target_ongoing_requests", "replica_num_cpus")


def parse_args(args: dict) -> dict:
    """Builder arguments (strings, as ``serve run`` passes them) -> typed settings; ConfigError if malformed."""
    from liedeploy.serving.specs import parse_input_flag, parse_size

    known = {"model", "weights", "adapters", "input_shape", "input", "model_kwargs", "device", "cache_bytes",
             "max_body", "admin_token_file", "affinity", *_INT, *_FLOAT}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"unknown build_app argument {unknown[0]!r}; known: {', '.join(sorted(known))}")
    for k in ("model", "weights", "adapters"):
        if not args.get(k):
            raise ConfigError(f"build_app needs {k}=...")
    out = {k: str(args[k]) for k in ("model", "weights", "adapters")}
    try:
        for k in _INT:
            if k in args:
                out[k] = int(args[k])
        for k in _FLOAT:
            if k in args:
                out[k] = float(args[k])
        if "input_shape" in args:
            out["input_shape"] = tuple(int(s) for s in str(args["input_shape"]).split(","))
    except ValueError as exc:
        raise ConfigError(f"build_app argument is not a number: {exc}") from None
    inputs = args.get("input")
    if inputs:
        out["inputs"] = [parse_input_flag(i) for i in (inputs if isinstance(inputs, list) else str(inputs).split(";"))]
    if "model_kwargs" in args:
        import json

        kw = args["model_kwargs"]
        out["model_kwargs"] = kw if isinstance(kw, dict) else json.loads(kw)
    if "affinity" in args:
        out["affinity"] = str(args["affinity"]).lower() not in ("0", "false", "no")
    for k in ("device", "admin_token_file"):
        if k in args:
            out[k] = str(args[k])
    for k in ("cache_bytes", "max_body"):
        if k in args:
            try:
                out[k] = parse_size(str(args[k]))
            except ValueError as exc:
                raise ConfigError(f"build_app argument {k} {exc}") from None
    if "input_shape" not in out and "inputs" not in out:
        raise ConfigError("build_app needs input_shape=1,3,224,224 or input=NAME:DATATYPE:SHAPE[;...]")
    return out


def _serve_config(settings: dict):
    from liedeploy.serving.server import ServeConfig

    fields = {k: v for k, v in settings.items() if k in ServeConfig.__dataclass_fields__}
    return ServeConfig(**fields)


class RayRoutedBackend:
    """The ingress's backend: tasks registered from headers here, batches run on the replicas."""

    kind = "torch"
    file_suffix = ".safetensors"

    def __init__(self, replicas, settings: dict):
        from liedeploy.io.safetensors_io import BaseTensors
        from liedeploy.bank.task_registry import TaskRegistry

        cfg = _serve_config(settings)
        self.replicas = replicas
        self.affinity = settings.get("affinity", True)
        self._inputs = cfg.input_specs()
        self.request_timeout = cfg.request_timeout
        base = BaseTensors(cfg.weights)  # headers only; a tensor's bytes are hashed once, when a task needs it
        self.registry = TaskRegistry(base.shapes, base.sha256, base.dtypes)
        self._outputs: Optional[list] = None
        self._replica_stats: dict = {}

    def tasks(self) -> list:
        return self.registry.names

    def discover(self, folder: str) -> dict:
        from liedeploy.serving.backend import discover_task_files

        return discover_task_files(folder, self.file_suffix)

    def add(self, task: str, path: str) -> None:
        self.registry.put(self.registry.read(task, path, lazy=True), replace=True)

    def remove(self, task: str) -> None:
        self.registry.pop(task)

    def prefetch(self, task: str) -> None:
        self._call(task, "prefetch")

    def is_resident(self, task) -> bool:
        return True  # Ray's multiplexed routing prefers the replicas that hold the task

    def inputs(self) -> list:
        return list(self._inputs)

    def outputs(self, task) -> list:
        from liedeploy.serving.specs import TensorSpec

        if self._outputs is None:
            self._outputs = [TensorSpec(**s) for s in self._call(None, "outputs")]
        return self._outputs

    def _call(self, task, method: str, *args):
        from ray.exceptions import RayActorError, RayTaskError

        from liedeploy.serving.errors import Unavailable

        if self.affinity:
            handle = getattr(self.replicas.options(multiplexed_model_id=task or "base"), method)
        else:  # measurement baseline: any replica, which folds the task into its own bank
            handle = getattr(self.replicas, method + "_any")
            args = (task,) + args
        last = None
        for attempt in range(3):  # a replica that died: Ray routes the retry to a live one
            try:
                return handle.remote(*args).result(timeout_s=self.request_timeout)
            except RayTaskError as exc:
                cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
                if isinstance(cause, LieError):
                    raise LieError(str(cause).split("\n")[-1].strip() or str(cause)) from None
                last = exc
            except (RayActorError, TimeoutError) as exc:
                last = exc
            except Exception as exc:  # noqa: BLE001 - Ray's own errors (replica unavailable, ...)
                last = exc
            time.sleep(0.2 * (attempt + 1))
        why = str(last).strip().splitlines()[-1][:200] if str(last).strip() else type(last).__name__
        raise Unavailable(f"no replica could run the request ({why}); retry")

    def run(self, task, inputs: dict) -> dict:
        out = self._call(task, "infer", inputs)
        stats = out.pop(_STATS_KEY, None)
        if stats is not None:
            self._replica_stats[out.get(REPLICA_KEY)] = stats
        return out

    def run_mixed(self, tasks, inputs):  # pragma: no cover - the batcher sends one task per batch
        raise LieError("the Ray backend runs one task per batch")

    def stats(self) -> dict:
        keys = ("resident", "resident_bytes", "hits", "misses", "evictions", "loads", "load_seconds")
        total = {k: sum(s.get(k, 0) for s in self._replica_stats.values()) for k in keys}
        total["registered"] = len(self.registry)
        return total


class _Resident:
    """A task folded in one replica's bank; Ray's multiplexed LRU drops it with ``__del__``."""

    def __init__(self, backend, task: str):
        self.backend, self.task = backend, task

    def __del__(self):
        try:
            self.backend.remove(self.task)
        except Exception:  # noqa: BLE001 - already removed
            pass


def ingress_state(replicas, settings: dict):
    """The ingress's :class:`~liedeploy.serving.state.ServingState`, built as ``liedeploy serve``
    builds its own (the same admin-token reader and limits), over :class:`RayRoutedBackend`."""
    from liedeploy.serving.server import read_admin_token
    from liedeploy.serving.state import ServingState

    cfg = _serve_config(settings)
    token = read_admin_token(cfg.admin_token_file)
    workers = max(2, 2 * int(settings.get("num_replicas", settings.get("max_replicas", 1))))
    state = ServingState(
        RayRoutedBackend(replicas, settings), cfg.adapters, admin_token=token, max_body=cfg.max_body,
        max_inflight_bytes=cfg.max_inflight_bytes, request_timeout=cfg.request_timeout,
        batching=dict(max_batch=cfg.max_batch, max_delay=cfg.max_delay_ms / 1000.0, max_queue=cfg.max_queue,
                      max_wait=cfg.max_wait_ms / 1000.0, workers=workers))
    state.scan()
    return state


def _deployments():
    serve = require("ray.serve", "ray", "the Ray Serve application")

    class TaskReplica:
        def __init__(self, settings: dict, max_tasks: int):
            from liedeploy.serving.server import build_backend

            cfg = _serve_config(settings)
            self.backend = build_backend(cfg)
            self.adapters = cfg.adapters
            try:
                self.replica_id = serve.get_replica_context().replica_id.unique_id
            except Exception:  # noqa: BLE001
                self.replica_id = f"pid{os.getpid()}"
            backend, adapters = self.backend, self.adapters

            async def load(task: str) -> _Resident:  # a plain function: the LRU lives on it, per replica
                path = task_file(adapters, task, backend.file_suffix)
                await asyncio.to_thread(backend.add, task, path)
                await asyncio.to_thread(backend.prefetch, task)
                return _Resident(backend, task)

            self.get_task = serve.multiplexed(max_num_models_per_replica=max_tasks)(load)

        async def _task(self) -> Optional[str]:
            task = serve.get_multiplexed_model_id()
            if task in ("", "base"):
                return None
            await self.get_task(task)
            return task

        async def infer(self, inputs: dict) -> dict:
            task = await self._task()
            out = await asyncio.to_thread(self.backend.run, task, inputs)
            out[REPLICA_KEY] = self.replica_id
            out[_STATS_KEY] = self.backend.stats()
            return out

        async def prefetch(self) -> None:
            await self._task()

        async def infer_any(self, task: Optional[str], inputs: dict) -> dict:
            """Without affinity (a measurement baseline): this replica folds ``task`` into its bank."""
            if task is not None and task not in self.backend.tasks():
                path = task_file(self.adapters, task, self.backend.file_suffix)
                await asyncio.to_thread(self.backend.add, task, path)
            out = await asyncio.to_thread(self.backend.run, task, inputs)
            out[REPLICA_KEY] = self.replica_id
            out[_STATS_KEY] = self.backend.stats()
            return out

        async def prefetch_any(self, task: Optional[str]) -> None:
            return None

        async def outputs_any(self, task: Optional[str]) -> list:
            return await self.outputs()

        async def outputs(self) -> list:
            return [s.to_json() for s in await asyncio.to_thread(self.backend.outputs, None)]

    class Ingress:
        def __init__(self, replicas, settings: dict):
            self.state = ingress_state(replicas, settings)

        def __serve_build_asgi_app__(self):
            from liedeploy.serving.app import create_app

            return create_app(self.state)

    return serve, TaskReplica, Ingress


INGRESS_CPUS = 0.1


def fit_replicas(replicas: int, replica_num_cpus, cluster_cpus, *, device: str = "cpu", cluster_gpus=0.0,
                 log=print) -> dict:
    """Ray actor options that let ``replicas`` replicas and the ingress fit the cluster, or a refusal.

    ``replica_num_cpus`` given (a number) must fit as it is: refused in one sentence naming the
    setting otherwise (Ray would wait for the cluster forever). Not given (None): 1 CPU per replica
    where that fits, else sized down so that they fit, and said in ``log``. ``device="cuda"`` takes a
    GPU share per replica (refused on a cluster without GPUs). ``cluster_cpus`` None: unknown (no
    check, 1 CPU per replica unless given).
    """
    from liedeploy.errors import ConfigError

    replicas = max(1, int(replicas))
    opts: dict = {}
    if cluster_cpus is None:
        opts["num_cpus"] = 1.0 if replica_num_cpus is None else float(replica_num_cpus)
    else:
        need = lambda per: replicas * per + INGRESS_CPUS  # noqa: E731
        if replica_num_cpus is not None:
            if need(float(replica_num_cpus)) > cluster_cpus + 1e-9:
                raise ConfigError(
                    f"{replicas} replica(s) x replica_num_cpus={float(replica_num_cpus):g} plus the ingress's "
                    f"{INGRESS_CPUS:g} need {need(float(replica_num_cpus)):g} CPUs and the Ray cluster has "
                    f"{cluster_cpus:g}: lower replica_num_cpus or num_replicas (Ray would wait for CPUs forever)")
            opts["num_cpus"] = float(replica_num_cpus)
        elif need(1.0) <= cluster_cpus + 1e-9:
            opts["num_cpus"] = 1.0
        else:
            per = int((cluster_cpus - INGRESS_CPUS) / replicas * 100) / 100
            if per < 0.01:
                raise ConfigError(f"{replicas} replica(s) do not fit the Ray cluster's {cluster_cpus:g} CPUs: "
                                  "lower num_replicas")
            opts["num_cpus"] = per
            log(f"liedeploy: replica_num_cpus sized to {per:g} so that {replicas} replica(s) and the ingress fit the "
                f"cluster's {cluster_cpus:g} CPUs (set replica_num_cpus to choose)")
    if device.startswith("cuda"):
        if not cluster_gpus:
            raise ConfigError("device=cuda but the Ray cluster has no GPU: start Ray on a GPU machine or use device=cpu")
        opts["num_gpus"] = min(1.0, int(cluster_gpus / replicas * 100) / 100)
        if opts["num_gpus"] < 0.01:
            raise ConfigError(f"{replicas} replica(s) do not fit the Ray cluster's {cluster_gpus:g} GPUs: lower num_replicas")
    return opts


def _cluster_resources() -> tuple:
    """``(CPUs, GPUs)`` of the connected Ray cluster, ``(None, None)`` when not connected."""
    import ray

    if not ray.is_initialized():
        return None, None
    res = ray.cluster_resources()
    return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))


def build_app(args: dict):
    """Ray Serve application builder (``serve run liedeploy.serving.ray:build_app key=value ...``).

    Arguments (strings): ``model``, ``weights``, ``adapters`` (a folder every node sees), ``input_shape``
    or ``input`` (``NAME:DATATYPE:SHAPE`` joined by ``;``), ``num_replicas`` (default 1) or
    ``min_replicas``/``max_replicas``/``target_ongoing_requests`` (autoscaling),
    ``max_tasks_per_replica`` (default 8), ``cache_bytes``, ``max_batch``, ``max_delay_ms``,
    ``max_wait_ms``, ``max_queue``, ``max_body``, ``request_timeout``, ``admin_token_file``, ``device``,
    ``threads``, ``replica_num_cpus`` (CPUs Ray reserves per replica; default 1, sized down and logged
    when the replicas and the ingress would not fit the cluster's CPUs; a given value that does not fit
    is refused), ``max_ongoing_requests``
    (per replica; past it Ray routes a task's batch to another replica), ``affinity`` (default true;
    false routes every batch to any replica, a baseline for measurements).
    """
    settings = parse_args(dict(args))
    serve, TaskReplica, Ingress = _deployments()
    cpus, gpus = _cluster_resources()
    most = settings.get("max_replicas", settings.get("min_replicas", settings.get("num_replicas", 1)))
    opts: dict = {"ray_actor_options": fit_replicas(most, settings.get("replica_num_cpus"), cpus,
                                                    device=settings.get("device", "cpu"), cluster_gpus=gpus)}
    if "max_ongoing_requests" in settings:
        opts["max_ongoing_requests"] = settings["max_ongoing_requests"]
    if "min_replicas" in settings or "max_replicas" in settings:
        opts["autoscaling_config"] = {
            "min_replicas": settings.get("min_replicas", 1),
            "max_replicas": settings.get("max_replicas", max(1, settings.get("min_replicas", 1))),
            "target_ongoing_requests": settings.get("target_ongoing_requests", 2.0),
        }
    else:
        opts["num_replicas"] = settings.get("num_replicas", 1)
    replica = serve.deployment(TaskReplica, name="TaskReplica").options(**opts)
    # the ingress batches: it must see every concurrent request (Ray's default of 5 ongoing
    # requests per replica would make the proxy queue the rest and the batches would stay tiny)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress").options(
        ray_actor_options={"num_cpus": INGRESS_CPUS}, max_ongoing_requests=settings.get("max_queue", 1024))
    return ingress.bind(replica.bind(settings, settings.get("max_tasks_per_replica", 8)), settings)
