"""HTTP routes of text generation: OpenAI-compatible (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, streaming as server-sent events ending in ``data: [DONE]``) and the
KServe/Triton generate extension (``/v2/models/{task}/generate`` and ``/generate_stream``).
Registered by :func:`liedeploy.serving.app.create_app` when the server has a generator."""

from __future__ import annotations

import time

from liedeploy.errors import LieError
from liedeploy.serving.errors import BadRequest, to_response_parts
from liedeploy.serving.generate import completion_id, openai_error, parse_params, sse
from liedeploy.serving.limits import read_body
from liedeploy.serving.protocol import json_loads, json_response
from liedeploy.serving.state import BASE_TASK

__all__ = ["GENERATE_ROUTES"]


async def _body(state, request) -> dict:
    raw, reserved = await read_body(request, state.max_body, state.inflight_bytes)
    state.inflight_bytes.release(reserved)
    try:
        body = json_loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _task(state, name) -> object:
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' must name a task (or 'base')")
    return state.resolve(name)


async def list_models(state, request):
    names = [BASE_TASK] + sorted(state.backend.tasks())
    return json_response(200, {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                                            "owned_by": "liedeploy"} for n in names]})


async def _openai(state, request, chat: bool):
    from starlette.responses import StreamingResponse

    gen = state.generator
    body = await _body(state, request)
    name = body.get("model")
    task = _task(state, name)
    if chat and "messages" not in body:
        raise BadRequest("'messages' is required")
    ids = gen.prompt_ids(messages=body.get("messages")) if chat else gen.prompt_ids(prompt=body.get("prompt"))
    p = parse_params(body, gen.max_new_tokens)
    cid, created = completion_id("chatcmpl" if chat else "cmpl"), int(time.time())
    obj = "chat.completion" if chat else "text_completion"

    def choice(text, reason, first=False):
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

    seq = gen.start(task, ids, p)  # 404 / 400 / 503 before the answer starts
    if not body.get("stream"):
        out = await gen.complete(seq)
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                 "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
        c = ({"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": out["finish_reason"]}
             if chat else {"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out["finish_reason"]})
        return json_response(200, {"id": cid, "object": obj, "created": created, "model": name, "choices": [c],
                                    "usage": usage})

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    async def events():
        first = True
        try:
            async for delta, reason in gen.stream(seq):
                if delta or reason:
                    yield sse({"id": cid, "object": chunk_obj, "created": created, "model": name,
                               "choices": [choice(delta, reason, first)]})
                    first = False
        except LieError as exc:
            yield sse(openai_error(exc)[1])
        yield sse(b"[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


async def completions(state, request):
    return await _openai(state, request, chat=False)


async def chat_completions(state, request):
    return await _openai(state, request, chat=True)


async def kserve_generate(state, request):
    gen = state.generator
    name = request.path_params["task"]
    task = state.resolve(name)
    body = await _body(state, request)
    text = body.get("text_input")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    ids = gen.prompt_ids(prompt=text)
    p = parse_params(params, gen.max_new_tokens)
    seq = gen.start(task, ids, p)
    if request.url.path.endswith("_stream"):
        from starlette.responses import StreamingResponse

        async def events():
            async for delta, reason in gen.stream(seq):
                if delta:
                    yield sse({"model_name": name, "model_version": "1", "text_output": delta})

        return StreamingResponse(events(), media_type="text/event-stream")
    out = await gen.complete(seq)
    return json_response(200, {"model_name": name, "model_version": "1", "text_output": out["text"]})


def _openai_endpoint(state, handler):
    """OpenAI routes answer errors in OpenAI's error body."""

    async def endpoint(request):
        try:
            return await handler(state, request)
        except Exception as exc:  # noqa: BLE001 - every refusal by class
            status, body, headers = openai_error(exc)
            return json_response(status, body, headers)

    return endpoint


def _kserve_endpoint(state, handler):
    async def endpoint(request):
        try:
            return await handler(state, request)
        except Exception as exc:  # noqa: BLE001
            status, body, headers = to_response_parts(exc)
            return json_response(status, body, headers)

    return endpoint


# (path, handler, methods, error style)
GENERATE_ROUTES = [
    ("/v1/models", list_models, ["GET"], _openai_endpoint),
    ("/v1/completions", completions, ["POST"], _openai_endpoint),
    ("/v1/chat/completions", chat_completions, ["POST"], _openai_endpoint),
    ("/v2/models/{task}/generate", kserve_generate, ["POST"], _kserve_endpoint),
    ("/v2/models/{task}/generate_stream", kserve_generate, ["POST"], _kserve_endpoint),
]
