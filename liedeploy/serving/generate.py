"""Text generation for language-model tasks: the OpenAI-compatible API and the KServe/Triton
generate extension, over the same bank of folded tasks (``liedeploy serve --hf-model DIR``).

Requests are decoded by one continuous-batching engine (:mod:`liedeploy.serving.decode_engine`)
on their task's replica (the base with the task's folded weights, shared tensors otherwise), with
the tokenizer's own chat template and transformers' logits warpers. With temperature 0 the tokens
are the merged model's greedy tokens; with a seed, sampling is reproducible. Sequences and KV-cache
bytes are bounded (``max_sequences``, ``max_kv_bytes``): beyond them the answer is 503 with
``Retry-After``. A request whose client goes away leaves its batch at the next step.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Optional

from liedeploy.errors import LieError
from liedeploy.serving.errors import BadRequest, NotFound, ProtocolError

__all__ = ["Generator", "GenerationParams", "parse_params", "openai_error"]


class GenerationParams:
    """Checked sampling parameters of one request."""

    __slots__ = ("max_tokens", "temperature", "top_p", "seed", "stop")

    def __init__(self, max_tokens: int, temperature: float, top_p: float, seed: Optional[int], stop: list):
        self.max_tokens, self.temperature, self.top_p, self.seed, self.stop = max_tokens, temperature, top_p, seed, stop


def _number(body: dict, key: str, kind, default, lo, hi):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise BadRequest(f"'{key}' must be a {'whole ' if kind is int else ''}number, got {v!r}")
    v = kind(v)
    if not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {v}")
    return v


def parse_params(body: dict, max_new_tokens: int) -> GenerationParams:
    """The sampling parameters of an OpenAI or KServe request body; 400 in one sentence otherwise."""
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("only n=1 is served")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}")
    return GenerationParams(
        max_tokens=_number(body, "max_tokens", int, 16, 1, max_new_tokens),
        temperature=_number(body, "temperature", float, 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 1e-6, 1.0),
        seed=seed,
        stop=stop,
    )


def openai_error(exc: BaseException) -> tuple[int, dict, Optional[dict]]:
    """``(status, OpenAI error body, headers)``."""
    status = exc.status if isinstance(exc, ProtocolError) else (503 if isinstance(exc, LieError) else 500)
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "server_error"}.get(status, "server_error")
    message = str(exc) if isinstance(exc, LieError) else f"internal error: {type(exc).__name__}"
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ProtocolError) and exc.retry_after else None
    return status, {"error": {"message": message, "type": kind, "code": status}}, headers


class Generator:
    """Generation over a bank's tasks, continuously batched (:mod:`liedeploy.serving.decode_engine`).

    Args:
        bank: the :class:`~liedeploy.AdapterBank` of the server's torch backend.
        tokenizer: the model folder's tokenizer.
        max_prompt_tokens: longest prompt (400 beyond).
        max_new_tokens: largest ``max_tokens`` (400 beyond).
        max_sequences: sequences admitted at once (503 with Retry-After beyond).
        max_kv_bytes: KV-cache bytes reserved at most, prompt + ``max_tokens`` tokens per sequence
            (503 with Retry-After beyond); default: room for ``max_sequences`` sequences of the
            longest prompt and ``max_new_tokens``.
        observe: ``observe(kind, seconds)`` for time to first token (``"ttft"``) and between tokens (``"itl"``).
        engine_thread: run the decode engine on a thread of its own (``False``: the caller runs
            ``generator.engine.run()`` on its compute thread).
        max_batch_tasks: distinct tasks decoding at once (their folded weights are held while their
            rows run); sequences of other tasks wait. ``None``: no bound beyond ``max_sequences``.
    """

    def __init__(self, bank, tokenizer, *, max_prompt_tokens: int = 2048, max_new_tokens: int = 512,
                 max_sequences: int = 8, max_kv_bytes: Optional[int] = None, observe=None,
                 engine_thread: bool = True, max_batch_tasks: Optional[int] = None):
        from liedeploy.serving.decode_engine import DecodeEngine
        from liedeploy.serving.kv_cache import kv_bytes_per_token

        self.bank, self.tokenizer = bank, tokenizer
        self.max_prompt_tokens, self.max_new_tokens = int(max_prompt_tokens), int(max_new_tokens)
        base = bank.model_for(None)
        self.kv_per_token = kv_bytes_per_token(base)
        max_sequences = max(1, int(max_sequences))
        if max_kv_bytes is None:
            max_kv_bytes = max_sequences * (self.max_prompt_tokens + self.max_new_tokens) * self.kv_per_token
        self.max_kv_bytes = int(max_kv_bytes)
        cfg = getattr(base, "config", None)
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.context = getattr(text_cfg, "max_position_embeddings", None)  # None: the model sets no bound
        eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.engine = DecodeEngine(tokenizer, bank.lease, max_sequences=max_sequences,
                                   max_kv_bytes=self.max_kv_bytes, kv_per_token=self.kv_per_token,
                                   observe=observe, eos_ids=eos + [tokenizer.eos_token_id], thread=engine_thread,
                                   max_tasks=max_batch_tasks)

    @property
    def stats(self) -> dict:
        return self.engine.stats

    # -- inputs ---------------------------------------------------------------------------------
    def prompt_ids(self, prompt=None, messages=None) -> list:
        tok = self.tokenizer
        if messages is not None:
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string content")
            if not getattr(tok, "chat_template", None):
                raise BadRequest("this model's tokenizer has no chat template: use /v1/completions with a prompt")
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise BadRequest("'prompt' must be a non-empty string")
            ids = tok(prompt)["input_ids"]
        ids = list(ids)
        if len(ids) > self.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(ids)} tokens; at most {self.max_prompt_tokens} are served")
        if not ids:
            raise BadRequest("the prompt encodes to no token")
        return ids

    def check_task(self, task: Optional[str]) -> None:
        if task is not None and task not in self.bank.tasks:
            raise NotFound(f"unknown task {task!r}")

    # -- generation -------------------------------------------------------------------------------
    def start(self, task: Optional[str], ids: list, p: GenerationParams):
        """Admit one request (404, 400 or 503 here, before any byte of the answer) and return its sequence."""
        from liedeploy.serving.sequence import Sequence

        self.check_task(task)
        if self.context is not None and len(ids) + p.max_tokens > self.context:
            raise BadRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({p.max_tokens}) exceed the model's "
                             f"context of {self.context} tokens")
        seq = Sequence(ids, p, asyncio.get_running_loop())
        self.engine.submit(task, seq)
        return seq

    async def stream(self, seq):
        """Yield ``(text delta, finish_reason or None)``; the last item has a finish reason."""
        try:
            while True:
                item = await seq.queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item, None
            yield "", seq.reason or "stop"
        finally:
            seq.cancelled.set()  # a client that went away: its row leaves the batch at the next step

    async def complete(self, seq) -> dict:
        """``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`` of one request."""
        text, reason = "", "stop"
        async for delta, why in self.stream(seq):
            text += delta
            reason = why or reason
        return {"text": text, "finish_reason": reason, "prompt_tokens": len(seq.ids),
                "completion_tokens": len(seq.tokens)}


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj) -> bytes:
    from liedeploy.serving.protocol import json_dumps

    return b"data: " + (obj if isinstance(obj, bytes) else json_dumps(obj)) + b"\n\n"
