"""Text generation for language-model tasks: the OpenAI-compatible API and the KServe/Triton
generate extension, over the same bank of folded tasks (``liedeploy serve --hf-model DIR``).

Each request runs transformers' ``generate()`` on its task's replica (the base with the task's
folded weights, shared tensors otherwise), on a worker thread, with the tokenizer's own chat
template, logits processing and stop strings. With temperature 0 the tokens are the merged
model's greedy tokens, and greedy requests of one task that arrive together are decoded in one
batch (:mod:`liedeploy.serving.decode_batch`); sampled requests decode alone (their seed decides
their tokens). Concurrent sequences are bounded (``max_sequences``): beyond the bound the answer is
503 with ``Retry-After``. A streamed request whose client goes away stops at the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from typing import Optional

from liedeploy.errors import LieError
from liedeploy.serving.errors import BadRequest, NotFound, ProtocolError, Unavailable

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


class _Cancel:
    """A stopping criterion set when the client goes away."""

    def __init__(self):
        self.flag = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopStrings:
    """A stopping criterion: the decoded continuation holds one of the stop strings."""

    def __init__(self, tokenizer, prompt_len: int, stop: list):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.prompt_len:].tolist(), skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), any(s in text for s in self.stop), dtype=torch.bool,
                          device=input_ids.device)


class Generator:
    """Generation over a bank's tasks.

    Args:
        bank: the :class:`~liedeploy.AdapterBank` of the server's torch backend.
        tokenizer: the model folder's tokenizer.
        max_prompt_tokens: longest prompt (400 beyond).
        max_new_tokens: largest ``max_tokens`` (400 beyond).
        max_sequences: sequences decoding at once (503 with Retry-After beyond).
    """

    def __init__(self, bank, tokenizer, *, max_prompt_tokens: int = 2048, max_new_tokens: int = 512,
                 max_sequences: int = 8):
        self.bank, self.tokenizer = bank, tokenizer
        self.max_prompt_tokens, self.max_new_tokens = int(max_prompt_tokens), int(max_new_tokens)
        self.slots = threading.BoundedSemaphore(max(1, int(max_sequences)))
        self.seed_lock = threading.Lock()  # generate() samples from torch's global generator
        from liedeploy.serving.decode_batch import GreedyBatcher

        self.greedy = GreedyBatcher(tokenizer, window=0.03, max_batch=max(1, int(max_sequences)))
        self.stats = {"tokens": 0, "sequences": 0, "running": 0}

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

    def model(self, task: Optional[str]):
        if task is not None and task not in self.bank.tasks:
            raise NotFound(f"unknown task {task!r}")
        return self.bank.model_for(task)

    # -- generation -------------------------------------------------------------------------------
    def _kwargs(self, ids, p: GenerationParams, streamer=None, cancel: Optional[_Cancel] = None) -> dict:
        import torch
        from transformers import StoppingCriteriaList

        kw = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "max_new_tokens": p.max_tokens, "do_sample": p.temperature > 0,
              "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
              else self.tokenizer.eos_token_id}
        if p.temperature > 0:
            kw.update(temperature=p.temperature, top_p=p.top_p)
        criteria = [cancel] if cancel is not None else []
        if p.stop:
            criteria.append(_StopStrings(self.tokenizer, len(ids), p.stop))
        if streamer is not None:
            kw["streamer"] = streamer
        if criteria:
            kw["stopping_criteria"] = StoppingCriteriaList(criteria)
        return kw

    def _run(self, model, kw: dict, seed: Optional[int]):
        import torch

        with torch.inference_mode():
            if seed is None:
                return model.generate(**kw)
            with self.seed_lock:
                torch.manual_seed(seed)
                return model.generate(**kw)

    def _acquire(self) -> None:
        if not self.slots.acquire(blocking=False):
            raise Unavailable("every generation slot is busy (--max-sequences); retry")
        self.stats["running"] += 1

    def _release(self) -> None:
        self.stats["running"] -= 1
        self.slots.release()

    def _cut(self, text: str, stop: list) -> tuple[str, bool]:
        cuts = [text.find(s) for s in stop if s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    async def _greedy_stream(self, task: Optional[str], ids: list, p: GenerationParams):
        """Greedy requests: decoded in a batch with the other greedy requests of the task."""
        from liedeploy.serving.decode_batch import Row

        model = self.model(task)
        self._acquire()
        row = Row(ids, p.max_tokens, p.stop, asyncio.get_running_loop())
        try:
            self.greedy.submit(task, model, row)
            while True:
                item = await row.queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item, None
            self.stats["tokens"] += len(row.tokens)
            self.stats["sequences"] += 1
            yield "", row.reason or "stop"
        finally:
            row.cancelled.set()  # a client that went away: its row stops at the next step
            self._release()

    async def complete(self, task: Optional[str], ids: list, p: GenerationParams) -> dict:
        """``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`` of one request."""
        if p.temperature == 0:
            text, reason, before = "", "stop", self.stats["tokens"]
            async for delta, why in self._greedy_stream(task, ids, p):
                text += delta
                reason = why or reason
            return {"text": text, "finish_reason": reason, "prompt_tokens": len(ids),
                    "completion_tokens": self.stats["tokens"] - before}
        model = self.model(task)
        self._acquire()
        try:
            out = await asyncio.to_thread(self._run, model, self._kwargs(ids, p), p.seed)
        finally:
            self._release()
        new = out[0, len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        ended = bool(new) and eos is not None and new[-1] == eos
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = self._cut(text, p.stop)
        self.stats["tokens"] += len(new)
        self.stats["sequences"] += 1
        reason = "stop" if (ended or stopped or len(new) < p.max_tokens) else "length"
        return {"text": text, "finish_reason": reason, "prompt_tokens": len(ids), "completion_tokens": len(new)}

    async def stream(self, task: Optional[str], ids: list, p: GenerationParams):
        """Yield ``(text delta, finish_reason or None)``; the last item has a finish reason."""
        from transformers import TextIteratorStreamer

        if p.temperature == 0:
            async for item in self._greedy_stream(task, ids, p):
                yield item
            return
        model = self.model(task)
        self._acquire()
        cancel = _Cancel()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        count = {"tokens": 0}
        done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def settle(fn, *args):
            try:
                loop.call_soon_threadsafe(lambda: done.done() or fn(*args))
            except RuntimeError:  # the loop is gone: nobody waits for this answer
                pass

        def work():  # the slot is freed here, when generation ends, whatever the client did
            try:
                out = self._run(model, self._kwargs(ids, p, streamer, cancel), p.seed)
                count["tokens"] = int(out.shape[1]) - len(ids)
                settle(done.set_result, None)
            except BaseException as exc:  # noqa: BLE001 - delivered to the response
                streamer.end()
                settle(done.set_exception, exc)
            finally:
                self._release()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        emitted, stopped = "", False
        try:
            while True:
                chunk = await asyncio.to_thread(next, streamer, None)
                if chunk is None:
                    break
                if stopped or not chunk:
                    continue
                text, stopped = self._cut(emitted + chunk, p.stop)
                delta = text[len(emitted):]
                emitted = text
                if stopped:
                    cancel.flag.set()
                if delta:
                    yield delta, None
            await done
            self.stats["tokens"] += count["tokens"]
            self.stats["sequences"] += 1
            yield "", ("stop" if stopped or count["tokens"] < p.max_tokens else "length")
        finally:
            cancel.flag.set()  # a client that went away stops its generation at the next token


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
