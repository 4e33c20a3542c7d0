"""Greedy requests of one task decoded together: one batched ``generate()`` per group.

Greedy requests for the same task that arrive within ``window`` seconds of each other (up to
``max_batch``) are left-padded into one batch and decoded in shared steps; each request still gets
its own tokens (per-row stop strings, ``max_tokens``, cancellation and streaming), and its tokens
are those of its task's merged model decoded alone. A request that arrives while its task's batch
is decoding waits for the next batch (requests do not join a running batch between steps).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Optional

__all__ = ["GreedyBatcher", "Row"]


class Row:
    """One request in a batch: its prompt, limits, and where its text goes."""

    def __init__(self, ids: list, max_tokens: int, stop: list, loop: asyncio.AbstractEventLoop):
        self.ids, self.max_tokens, self.stop, self.loop = ids, max_tokens, stop, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens: list = []
        self.text = ""
        self.done = False
        self.reason: Optional[str] = None
        self.cancelled = threading.Event()

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody reads this row any more
            pass


class _Streamer:
    """transformers' streamer protocol over a batch: each step's tokens go to their rows."""

    def __init__(self, rows: list, tokenizer, eos: Optional[int]):
        self.rows, self.tokenizer, self.eos = rows, tokenizer, eos
        self.first = True

    def put(self, value) -> None:
        if self.first:  # generate() first sends the prompt
            self.first = False
            return
        for row, tok in zip(self.rows, value.reshape(-1).tolist()):
            if row.done:
                continue
            if self.eos is not None and tok == self.eos:
                self._finish(row, "stop")
                continue
            row.tokens.append(tok)
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = [text.find(s) for s in row.stop if s in text]
            if cut:
                text = text[: min(cut)]
            delta, row.text = text[len(row.text):], text
            if delta:
                row.push(delta)
            if cut:
                self._finish(row, "stop")
            elif len(row.tokens) >= row.max_tokens:
                self._finish(row, "length")
            elif row.cancelled.is_set():
                self._finish(row, "stop")

    def _finish(self, row: Row, reason: str) -> None:
        row.done, row.reason = True, reason
        row.push(None)

    def end(self) -> None:
        for row in self.rows:
            if not row.done:
                self._finish(row, "length" if len(row.tokens) >= row.max_tokens else "stop")


class _RowsDone:
    """Stopping criterion: a row is done when its streamer says so."""

    def __init__(self, rows: list):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class GreedyBatcher:
    """Groups greedy requests per task and decodes each group in one batched ``generate()``."""

    def __init__(self, tokenizer, *, window: float = 0.01, max_batch: int = 16):
        self.tokenizer, self.window, self.max_batch = tokenizer, float(window), int(max_batch)
        self._pending: dict = {}  # task -> [(row, model)]
        self._lock = threading.Lock()

    def submit(self, task, model, row: Row) -> None:
        with self._lock:
            group = self._pending.setdefault(task, [])
            group.append((row, model))
            first = len(group) == 1
            full = len(group) >= self.max_batch
        if full:
            self._flush(task)
        elif first:
            row.loop.call_later(self.window, self._flush, task)

    def _flush(self, task) -> None:
        with self._lock:
            group = self._pending.pop(task, [])
        if group:
            threading.Thread(target=self._decode, args=(group,), daemon=True).start()

    def _decode(self, group: list) -> None:
        import torch
        from transformers import StoppingCriteriaList

        rows = [r for r, _ in group]
        model = group[0][1]
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt ends at the last column
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        streamer = _Streamer(rows, tok, tok.eos_token_id)
        try:
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in rows),
                               do_sample=False, pad_token_id=pad, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]))
        except Exception as exc:  # noqa: BLE001 - every row of the batch gets the error
            for r in rows:
                if not r.done:
                    r.done = True
                    r.push(exc)
            return
        streamer.end()
