"""The HTTP app: KServe Open Inference Protocol v2 on Starlette, one model per task.

Paths, status codes and names follow ARCHITECTURE.md ("Serving over the network"). The same
:class:`ServingState` and app are used by ``liedeploy serve`` and by the Ray Serve application.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
from typing import Optional

from liedeploy._version import __version__
from liedeploy.io.atomic import safe_file_name
from liedeploy.errors import LieError
from liedeploy.serving.batcher import Batcher
from liedeploy.serving.metrics import ServerMetrics
from liedeploy.serving.protocol import HEADER_LENGTH, ProtocolError, decode_infer_request, encode_infer_response

__all__ = ["ServingState", "create_app", "BASE_TASK"]

BASE_TASK = "base"
REPLICA_KEY = "__liedeploy_replica__"  # an output a backend may add: the replica that ran it (a header)
EXTENSIONS = ["binary_tensor_data", "model_repository"]


class ServingState:
    """Tasks and their states, the backend, the batcher, limits and metrics of one server.

    Args:
        backend: a :class:`~liedeploy.serving.backend.Backend`.
        adapters_dir: the folder of task files (``{task}.safetensors`` for torch).
        admin_token: bearer token for the model repository calls (None: they are refused, 403).
        max_body: largest request body in bytes (413 beyond).
        batching: keyword arguments of :class:`~liedeploy.serving.batcher.Batcher`.
        request_timeout: seconds an infer request may take before it is answered 503.
    """

    def __init__(self, backend, adapters_dir: Optional[str], *, admin_token: Optional[str] = None,
                 max_body: int = 64 << 20, batching: Optional[dict] = None, request_timeout: float = 60.0,
                 replica_id: Optional[str] = None):
        self.backend = backend
        self.adapters_dir = adapters_dir
        self.admin_token = admin_token
        self.max_body = int(max_body)
        self.request_timeout = request_timeout
        self.replica_id = replica_id
        self.unavailable: dict = {}  # task -> reason
        self.draining = False
        self.inflight = 0
        self._lock = threading.Lock()
        self.metrics = ServerMetrics(backend.stats, lambda: self.batcher.depth)
        self.batcher = Batcher(backend, on_batch=self.metrics.on_batch, on_task_error=self._task_failed,
                               **(batching or {}))
        self.suffix = getattr(backend, "file_suffix", ".safetensors")

    # -- tasks ------------------------------------------------------------------------------
    def scan(self) -> dict:
        """Register every task file of ``adapters_dir`` (headers only); returns ``{task: reason}`` refused."""
        if not self.adapters_dir:
            return {}
        discover = getattr(self.backend, "discover", None)
        if discover is not None:  # a backend whose folder holds more than task files (ONNX exports)
            for task in discover(self.adapters_dir):
                self.load(task, prefetch=False)
            return dict(self.unavailable)
        for f in sorted(os.listdir(self.adapters_dir)):
            if f.endswith(self.suffix) and not f.startswith("."):
                self.load(f[: -len(self.suffix)], prefetch=False)
        return dict(self.unavailable)

    def task_file(self, task: str) -> str:
        if not task or safe_file_name(task) != task:
            raise ProtocolError(400, f"task name {task!r} is not a plain file name")
        if task == BASE_TASK:
            raise ProtocolError(400, f"'{BASE_TASK}' is the base model; an adapter file named {BASE_TASK}{self.suffix} is refused")
        if not self.adapters_dir:
            raise ProtocolError(400, "the server has no adapters folder to load tasks from")
        return os.path.join(self.adapters_dir, task + self.suffix)

    def load(self, task: str, *, prefetch: bool = True) -> None:
        """(Re)load ``task`` from its file; a file that cannot be used marks the task unavailable."""
        try:
            path = self.task_file(task)
        except ProtocolError as exc:
            if task == BASE_TASK:
                self.unavailable[task] = str(exc)
                return
            raise
        if not os.path.exists(path):
            raise ProtocolError(404, f"no task file {os.path.basename(path)} in the adapters folder")
        try:
            self.backend.add(task, path)
            if prefetch:
                self.backend.prefetch(task)
        except LieError as exc:
            self._task_failed(task, exc)
            return
        self.unavailable.pop(task, None)

    def unload(self, task: str) -> None:
        if task == BASE_TASK:
            raise ProtocolError(400, "the base model cannot be unloaded")
        if task in self.backend.tasks():
            self.backend.remove(task)
        elif task not in self.unavailable:
            raise ProtocolError(404, f"unknown task {task!r}")
        self.unavailable.pop(task, None)

    def _task_failed(self, task, exc: Exception) -> None:
        if task is None:
            return
        with self._lock:
            self.unavailable[task] = str(exc)
            if task in self.backend.tasks():
                try:
                    self.backend.remove(task)
                except LieError:
                    pass

    def resolve(self, task: str) -> Optional[str]:
        """The backend's task for a model name (``base`` -> None), or a ProtocolError (404/503)."""
        if task == BASE_TASK:
            return None
        if task in self.unavailable:
            raise ProtocolError(503, f"task {task!r} is unavailable: {self.unavailable[task]}")
        if task not in self.backend.tasks():
            raise ProtocolError(404, f"unknown task {task!r}")
        return task

    def index(self) -> list:
        rows = [{"name": BASE_TASK, "version": "1", "state": "READY", "reason": ""}]
        rows += [{"name": t, "version": "1", "state": "READY", "reason": ""} for t in sorted(self.backend.tasks())]
        rows += [{"name": t, "version": "1", "state": "UNAVAILABLE", "reason": r}
                 for t, r in sorted(self.unavailable.items()) if t != BASE_TASK]
        return rows


def _json(status: int, payload, headers: Optional[dict] = None):
    from starlette.responses import Response

    return Response(json.dumps(payload), status_code=status, media_type="application/json", headers=headers)


def _error(exc: Exception):
    if isinstance(exc, ProtocolError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return _json(exc.status, {"error": str(exc)}, headers)
    return _json(400, {"error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})


async def _read_body(request, limit: int) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.isdigit():
            raise ProtocolError(400, f"Content-Length {cl!r} is not a number")
        if int(cl) > limit:
            raise ProtocolError(413, f"the request body of {int(cl)} bytes is over the limit of {limit} bytes (--max-body)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"the request body is over the limit of {limit} bytes (--max-body)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(state: ServingState):
    """The Starlette app serving ``state`` (a ServingState)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    m = state.metrics

    def admin(request) -> None:
        if state.admin_token is None:
            raise ProtocolError(403, "model repository calls are disabled: start the server with --admin-token-file")
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.admin_token.encode()):
            raise ProtocolError(401, "model repository calls need 'Authorization: Bearer <token>' with the admin token")

    async def live(request):
        return _json(200, {"live": True})

    async def ready(request):
        if state.draining:
            return _json(503, {"ready": False, "error": "the server is draining"}, {"Retry-After": "1"})
        return _json(200, {"ready": True})

    async def server_meta(request):
        return _json(200, {"name": "liedeploy", "version": __version__, "extensions": EXTENSIONS})

    async def model_meta(request):
        name = request.path_params["task"]
        try:
            if name in state.unavailable and name != BASE_TASK:
                return _json(200, {"name": name, "versions": ["1"], "platform": f"liedeploy_{state.backend.kind}",
                                   "state": "UNAVAILABLE", "reason": state.unavailable[name],
                                   "inputs": [s.to_json() for s in state.backend.inputs()], "outputs": []})
            task = state.resolve(name)
            outputs = await asyncio.to_thread(state.backend.outputs, task)
        except (ProtocolError, LieError) as exc:
            if isinstance(exc, LieError) and not isinstance(exc, ProtocolError):
                state._task_failed(name, exc)
                exc = ProtocolError(503, f"task {name!r} is unavailable: {exc}")
            return _error(exc)
        return _json(200, {"name": name, "versions": ["1"], "platform": f"liedeploy_{state.backend.kind}",
                           "state": "READY", "inputs": [s.to_json() for s in state.backend.inputs()],
                           "outputs": [s.to_json() for s in outputs]})

    async def model_ready(request):
        try:
            state.resolve(request.path_params["task"])
        except ProtocolError as exc:
            return _error(exc)
        if state.draining:
            return _json(503, {"error": "the server is draining"}, {"Retry-After": "1"})
        return _json(200, {"name": request.path_params["task"], "ready": True})

    async def infer(request):
        t0 = time.monotonic()
        name = request.path_params["task"]
        state.inflight += 1
        outcome = "error"
        try:
            if state.draining:
                outcome = "draining"
                raise ProtocolError(503, "the server is draining; retry on another replica", retry_after=1)
            task = state.resolve(name)
            body = await _read_body(request, state.max_body)
            req = decode_infer_request(body, request.headers.get(HEADER_LENGTH.lower()), state.backend.inputs())
            fut = state.batcher.submit(task, req.inputs, req.batch)
            try:
                out = await asyncio.wait_for(fut, state.request_timeout)
            except asyncio.TimeoutError:
                raise ProtocolError(503, f"the request took more than {state.request_timeout:g} s", retry_after=1) from None
            replica = out.pop(REPLICA_KEY, None) or state.replica_id
            payload, headers = encode_infer_response(name, req, out)
            if replica:
                headers["liedeploy-replica"] = str(replica)
            outcome = "ok"
            return Response(payload, headers=headers)
        except ProtocolError as exc:
            outcome = {400: "bad_request", 404: "not_found", 413: "too_large"}.get(exc.status, outcome)
            if exc.status == 503 and outcome != "draining":
                outcome = "queue_full" if "queue" in str(exc) else "unavailable"
            return _error(exc)
        except LieError as exc:  # the task's file failed when folded: unavailable from now on
            outcome = "unavailable"
            return _error(ProtocolError(503, f"task {name!r} is unavailable: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a fault of the server, never of the request
            return _json(500, {"error": f"internal error: {type(exc).__name__}: {str(exc)[:200]}"})
        finally:
            state.inflight -= 1
            m.requests.labels(outcome).inc()
            m.request_seconds.observe(time.monotonic() - t0)

    async def repo_index(request):
        try:
            admin(request)
        except ProtocolError as exc:
            return _error(exc)
        return _json(200, state.index())

    async def repo_load(request):
        try:
            admin(request)
            await _read_body(request, 1 << 20)
            task = request.path_params["task"]
            await asyncio.to_thread(state.load, task)
            if task in state.unavailable:
                raise ProtocolError(400, f"failed to load {task!r}: {state.unavailable[task]}")
        except ProtocolError as exc:
            return _error(exc)
        return _json(200, {})

    async def repo_unload(request):
        try:
            admin(request)
            await _read_body(request, 1 << 20)
            await asyncio.to_thread(state.unload, request.path_params["task"])
        except ProtocolError as exc:
            return _error(exc)
        return _json(200, {})

    async def metrics(request):
        body, ctype = m.render()
        return Response(body, media_type=ctype)

    async def http_error(request, exc: HTTPException):
        return _json(exc.status_code, {"error": str(exc.detail)})

    async def any_error(request, exc: Exception):
        return _json(500, {"error": f"internal error: {type(exc).__name__}"})

    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_meta, methods=["GET"]),
        Route("/v2/models/{task}", model_meta, methods=["GET"]),
        Route("/v2/models/{task}/versions/{version}", model_meta, methods=["GET"]),
        Route("/v2/models/{task}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{task}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{task}/infer", infer, methods=["POST"]),
        Route("/v2/models/{task}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repo_index, methods=["POST"]),
        Route("/v2/repository/models/{task}/load", repo_load, methods=["POST"]),
        Route("/v2/repository/models/{task}/unload", repo_unload, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: any_error})
    app.state.serving = state
    return app
