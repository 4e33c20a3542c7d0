"""The HTTP app: KServe Open Inference Protocol v2 on Starlette, one model per task.

HTTP only: each handler reads the request, calls the model repository
(:class:`~liedeploy.serving.state.ServingState`), the protocol codec and the batcher, and raises
on refusal; :func:`create_app` registers the routes and turns every exception into a response
through :mod:`liedeploy.serving.errors` (the status comes from the exception's class). Paths,
status codes and names are those of the README's "Serving over the network" section. The same app serves
``liedeploy serve`` and the Ray Serve application.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from liedeploy._version import __version__
from liedeploy.errors import LieError
from liedeploy.serving.errors import (
    Draining,
    Forbidden,
    NotFound,
    ProtocolError,
    Unauthorized,
    Unavailable,
    outcome_of,
    to_response_parts,
)
from liedeploy.serving.limits import read_body
from liedeploy.serving.protocol import (
    HEADER_LENGTH,
    decode_infer_request,
    encode_infer_response,
    json_response,
    precheck_infer_json,
)
from liedeploy.serving.state import BASE_TASK, ServingState

__all__ = ["create_app", "REPLICA_KEY", "ROUTES"]

REPLICA_KEY = "__liedeploy_replica__"  # an output a backend may add: the replica that ran it (a header)
EXTENSIONS = ["binary_tensor_data", "model_repository"]
OFF_LOOP_BYTES = 256 << 10  # bodies above this are decoded on a worker thread, never on the event loop


def _error_response(exc: BaseException):
    status, body, headers = to_response_parts(exc)
    return json_response(status, body, headers)


def _check_admin(state: ServingState, request) -> None:
    if state.admin_token is None:
        raise Forbidden("model repository calls are disabled: start the server with --admin-token-file")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.admin_token.encode()):
        raise Unauthorized("model repository calls need 'Authorization: Bearer <token>' with the admin token")


def _task_error(state: ServingState, name: str, exc: LieError) -> ProtocolError:
    """A LieError while running ``name``: the task was unloaded meanwhile (404) or cannot be used (503)."""
    if name != BASE_TASK and name not in state.backend.tasks() and name not in state.unavailable:
        return NotFound(f"unknown task {name!r}")
    state.mark_unavailable(name, exc)
    return Unavailable(f"task {name!r} is unavailable: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}")


# -- handlers ---------------------------------------------------------------------------------
async def live(state, request):
    return json_response(200, {"live": True})


async def ready(state, request):
    if state.draining:
        raise Draining("the server is draining")
    return json_response(200, {"ready": True})


async def server_meta(state, request):
    return json_response(200, {"name": "liedeploy", "version": __version__, "extensions": EXTENSIONS})


async def model_meta(state, request):
    name = request.path_params["task"]
    meta = {"name": name, "versions": ["1"], "platform": f"liedeploy_{state.backend.kind}",
            "inputs": [s.to_json() for s in state.backend.inputs()]}
    if name in state.unavailable and name != BASE_TASK:
        return json_response(200, {**meta, "state": "UNAVAILABLE", "reason": state.unavailable[name], "outputs": []})
    task = state.resolve(name)
    try:
        outputs = await asyncio.to_thread(state.backend.outputs, task)
    except LieError as exc:
        raise _task_error(state, name, exc) from None
    return json_response(200, {**meta, "state": "READY", "outputs": [s.to_json() for s in outputs]})


async def model_ready(state, request):
    state.resolve(request.path_params["task"])
    if state.draining:
        raise Draining("the server is draining")
    return json_response(200, {"name": request.path_params["task"], "ready": True})


async def infer(state, request):
    from starlette.responses import Response

    name = request.path_params["task"]
    if state.draining:
        raise Draining("the server is draining")
    task = state.resolve(name)
    body, reserved = await read_body(request, state.max_body, state.inflight_bytes)
    try:
        args = (body, request.headers.get(HEADER_LENGTH.lower()), state.backend.inputs())
        if len(body) > OFF_LOOP_BYTES:
            if args[1] is None:  # a large JSON body: refused from its head when it can be, before any parse
                precheck_infer_json(body, args[2])
            req = await asyncio.to_thread(decode_infer_request, *args)
        else:
            req = decode_infer_request(*args)
    finally:
        del body
        state.inflight_bytes.release(reserved)
    fut = state.batcher.submit(task, req.inputs, req.batch)
    try:
        out = await asyncio.wait_for(fut, state.request_timeout)
    except asyncio.TimeoutError:
        raise Unavailable(f"the request took more than {state.request_timeout:g} s") from None
    except LieError as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise _task_error(state, name, exc) from None
    replica = out.pop(REPLICA_KEY, None) or state.replica_id
    payload, headers = encode_infer_response(name, req, out)
    if replica:
        headers["liedeploy-replica"] = str(replica)
    return Response(payload, headers=headers)


async def repo_index(state, request):
    _check_admin(state, request)
    return json_response(200, state.index())


async def repo_load(state, request):
    _check_admin(state, request)
    await read_body(request, 1 << 20)
    task = request.path_params["task"]
    await asyncio.to_thread(state.load, task)
    if task in state.unavailable:
        from liedeploy.serving.errors import BadRequest

        raise BadRequest(f"failed to load {task!r}: {state.unavailable[task]}")
    return json_response(200, {})


async def repo_unload(state, request):
    _check_admin(state, request)
    await read_body(request, 1 << 20)
    await asyncio.to_thread(state.unload, request.path_params["task"])
    return json_response(200, {})


async def metrics(state, request):
    from starlette.responses import Response

    body, ctype = state.metrics.render()
    return Response(body, media_type=ctype)


# path -> (handler, methods); the versioned paths of the protocol go to the same handlers
ROUTES = [
    ("/v2/health/live", live, ["GET"]),
    ("/v2/health/ready", ready, ["GET"]),
    ("/v2", server_meta, ["GET"]),
    ("/v2/models/{task}", model_meta, ["GET"]),
    ("/v2/models/{task}/versions/{version}", model_meta, ["GET"]),
    ("/v2/models/{task}/ready", model_ready, ["GET"]),
    ("/v2/models/{task}/versions/{version}/ready", model_ready, ["GET"]),
    ("/v2/models/{task}/infer", infer, ["POST"]),
    ("/v2/models/{task}/versions/{version}/infer", infer, ["POST"]),
    ("/v2/repository/index", repo_index, ["POST"]),
    ("/v2/repository/models/{task}/load", repo_load, ["POST"]),
    ("/v2/repository/models/{task}/unload", repo_unload, ["POST"]),
    ("/metrics", metrics, ["GET"]),
]


def _endpoint(state: ServingState, handler):
    """A Starlette endpoint: the handler, any exception turned into its response; infer is counted."""
    counted = handler is infer

    async def endpoint(request):
        t0 = time.monotonic()
        if counted:
            state.inflight += 1
        outcome = "error"
        try:
            response = await handler(state, request)
            outcome = "ok"
            return response
        except Exception as exc:  # noqa: BLE001 - every refusal by class; a fault of ours is a 500
            outcome = outcome_of(exc)
            return _error_response(exc)
        finally:
            if counted:
                state.inflight -= 1
                state.metrics.requests.labels(outcome).inc()
                state.metrics.request_seconds.observe(time.monotonic() - t0)

    return endpoint


def create_app(state: ServingState):
    """The Starlette app serving ``state``: the routes of :data:`ROUTES`, errors by class."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    async def http_error(request, exc: HTTPException):
        return json_response(exc.status_code, {"error": str(exc.detail)})

    async def any_error(request, exc: Exception):
        return _error_response(exc)

    routes = [Route(path, _endpoint(state, handler), methods=methods) for path, handler, methods in ROUTES]
    if state.generator is not None:  # language-model tasks: the generation APIs too
        from liedeploy.serving.generate_routes import GENERATE_ROUTES

        routes = [Route(path, wrap(state, handler), methods=methods) for path, handler, methods, wrap in GENERATE_ROUTES] \
            + routes
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: any_error})
    app.state.serving = state
    return app
