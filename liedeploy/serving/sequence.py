"""One generation request's state: prompt, limits, sampler, the queue its text goes to, and the
incremental detokenization of its tokens (stop strings and ``max_tokens`` included)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Optional

__all__ = ["Sequence"]


class Sequence:
    """One request: its prompt, limits, sampler and where its text goes (an asyncio queue)."""

    def __init__(self, ids: list, params, loop: asyncio.AbstractEventLoop):
        self.ids, self.loop = list(ids), loop
        self.max_tokens, self.stop = params.max_tokens, list(params.stop)
        self.temperature, self.top_p = float(params.temperature), float(params.top_p)
        self.generator = None
        if self.temperature > 0:
            import torch

            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(int(params.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens: list = []
        self.text = ""
        self.prefix = self.read = 0  # incremental detokenization window
        self.cut = False  # a stop string ended the text
        self.done = False
        self.reason: Optional[str] = None
        self.cancelled = threading.Event()
        self.reserved = 0
        self.task = None  # set when submitted
        self.submitted = time.monotonic()
        self.last_token: Optional[float] = None

    def add_token(self, tok: int, tokenizer) -> tuple:
        """Append ``tok``; returns ``(the text it makes visible, the reason it ends the sequence or None)``.

        Incremental detokenization (as TGI and vLLM do): a short window that ends at the new token is
        decoded, and what it adds to the window without it is emitted once it is not a partial
        character. A stop string cuts the text and ends the sequence ("stop"), as do ``max_tokens``
        ("length") and a client that went away ("stop").
        """
        self.tokens.append(tok)
        before = tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)
        delta = ""
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)
        text = self.text + delta
        cut = [text.find(x) for x in self.stop if x in text]
        if cut:
            text = text[: min(cut)]
        delta, self.text = text[len(self.text):], text
        if cut:
            self.cut = True
            return delta, "stop"
        if len(self.tokens) >= self.max_tokens:
            return delta, "length"
        return delta, ("stop" if self.cancelled.is_set() else None)

    def held_back(self, tokenizer) -> str:
        """The text of a partial character still held back (added to ``text``), when the sequence ends."""
        if self.cut or self.read >= len(self.tokens):
            return ""
        rest = tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)[
            len(tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)):]
        self.text += rest
        return rest
