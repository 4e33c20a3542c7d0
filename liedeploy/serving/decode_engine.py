"""Continuous batching of text generation over many Lie tasks.

One engine thread owns every running sequence. Sequences of the same task form a group that
decodes in shared steps: one forward of the task's replica per step for the whole group, with a
left-padded KV cache (transformers' own ``DynamicCache``) and a 2-D attention mask. A request that
arrives while its task is decoding is prefilled (with the other newcomers of that task) and joins
the running batch before the next step; a sequence that ends, or whose client goes away, leaves at
the next step and its cache rows are dropped. Groups of different tasks take turns, one step each,
so one busy task never starves another.

Each sequence chooses its own tokens: greedy (temperature 0: the arg-max, so its tokens are those
of the task's merged model decoding alone), or sampled through transformers' temperature and
top-p warpers with its own seeded ``torch.Generator`` (a seed makes the output reproducible).
EOS, stop strings and ``max_tokens`` end a sequence, per row.

Admission is bounded twice: ``max_sequences`` sequences at once, and a KV-cache budget in bytes
(``max_kv_bytes``), reserved per sequence for its prompt plus ``max_tokens`` tokens. Beyond either
the answer is :class:`~liedeploy.serving.errors.Unavailable` (503 with Retry-After); a request that
alone needs more than the whole budget is a :class:`~liedeploy.serving.errors.BadRequest`.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from liedeploy.serving.errors import BadRequest, Unavailable
from liedeploy.serving.kv_cache import (cache_bytes, cache_kwarg, cache_of, grow_in_place, joinable, left_pad,
                                        model_device)
from liedeploy.serving.sequence import Sequence

__all__ = ["DecodeEngine", "Sequence"]


class _Group:
    """The running batch of one task: its replica, sequences, cache and attention mask."""

    def __init__(self, model):
        self.model = model  # the task's replica, or a MixedView over several tasks' replicas
        self.models: dict = {}  # mixed groups: task -> replica
        self.leases: dict = {}  # task -> the lease that holds its replica
        self.seqs: list = []
        self.pending: list = []
        self.cache = None
        self.mask = None  # (rows, columns) int64, 0 on left padding
        self.last = None  # (rows,) the token each row feeds next


def _release(group: _Group) -> None:
    """Let go of every replica the group holds."""
    for held in group.leases.values():
        held.release()
    group.leases, group.models, group.model = {}, {}, None


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


_MIXED = object()  # the key of the one group that holds every task's sequences in mixed mode


def _task_order(seq) -> tuple:
    return (seq.task is not None, seq.task or "")


class DecodeEngine:
    """Continuous batching over tasks; see the module docstring.

    Args:
        tokenizer: decodes tokens to text (stop strings) and gives the pad and EOS ids.
        lease: ``(task, uses) -> lease`` with ``lease.model`` (the task's replica; ``None``: the base),
            ``lease.use(n)`` (``n`` more requests of the held task) and ``lease.release()``
            (:meth:`liedeploy.bank.adapter_bank.AdapterBank.lease`; folds a cold task). Called on the
            engine thread; each request counts as one use, and a task's lease is released once no row
            of it is left.
        max_sequences: sequences admitted at once (running and waiting).
        max_kv_bytes: KV-cache bytes reserved at most (prompt + max_tokens tokens per sequence).
        kv_per_token: KV bytes per token of one sequence (:func:`liedeploy.serving.kv_cache.kv_bytes_per_token`).
        observe: ``observe(kind, seconds)`` with kind ``"ttft"`` or ``"itl"``, called per token.
        eos_ids: token ids that end a sequence.
        thread: start the engine on a thread of its own; ``False``: the caller runs :meth:`run` on
            the thread that does the process's torch work (see ``liedeploy.serving.server``).
        mixed: sequences of different tasks share one batch (a :class:`~liedeploy.bank.row_dispatch.MixedView`:
            shared layers run once, each task's own layers on its rows); ``False``, or a model whose
            layers are not row-wise, gives one batch per task.
        max_tasks: distinct tasks decoding at once (the base not counted); their folded weights are
            held while their rows run, whatever the bank's cache keeps, so this bounds that memory.
            A sequence of another task waits (admitted, not running) until a task leaves.
            ``None``: no bound beyond ``max_sequences``.
    """

    def __init__(self, tokenizer, lease: Callable, *, max_sequences: int, max_kv_bytes: int, kv_per_token: int,
                 observe: Optional[Callable[[str, float], None]] = None, eos_ids=(), thread: bool = True,
                 mixed: bool = True, max_tasks: Optional[int] = None):
        self.tokenizer, self.lease = tokenizer, lease
        self.max_sequences, self.max_kv_bytes, self.kv_per_token = int(max_sequences), int(max_kv_bytes), int(kv_per_token)
        self.observe = observe or (lambda kind, seconds: None)
        self.eos = set(int(e) for e in eos_ids if e is not None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = int(pad if pad is not None else 0)
        self._cv = threading.Condition()
        self._arrivals: list = []  # (task, Sequence)
        self._groups: dict = {}
        self._admitted = 0
        self._reserved = 0
        self._running = 0
        self.stats = {"tokens": 0, "sequences": 0, "running": 0, "waiting": 0, "kv_bytes": 0, "kv_reserved_bytes": 0,
                      "steps": 0, "joins": 0}
        self._closed = False
        self._outbox: list = []
        self.mixed = bool(mixed)
        self.max_tasks = None if max_tasks is None else max(1, int(max_tasks))
        self._owner: Optional[int] = None
        if thread:
            threading.Thread(target=self.run, name="liedeploy-decode", daemon=True).start()

    # -- admission (event loop) ------------------------------------------------------------------
    def submit(self, task, seq: Sequence) -> None:
        need = (len(seq.ids) + seq.max_tokens) * self.kv_per_token
        if need > self.max_kv_bytes:
            raise BadRequest(f"this request needs {need} bytes of KV cache ({len(seq.ids)} prompt + {seq.max_tokens} "
                             f"new tokens), more than the server's --max-kv-bytes {self.max_kv_bytes}")
        with self._cv:
            if self._admitted >= self.max_sequences:
                raise Unavailable("every generation slot is busy (--max-sequences); retry")
            if self._reserved + need > self.max_kv_bytes:
                raise Unavailable("the KV cache budget (--max-kv-bytes) is in use by running sequences; retry")
            self._admitted += 1
            self._reserved += need
            seq.reserved, seq.task = need, task
            self._arrivals.append((task, seq))
            self._sync_counts()
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    # -- the engine thread -------------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop, on the calling thread, until :meth:`close` (when built with ``thread=False``)."""
        self._owner = threading.get_ident()
        while True:
            with self._cv:
                while not self._arrivals and not self._groups and not self._closed:
                    self._cv.wait()
                if self._closed and not self._arrivals and not self._groups:
                    return
                arrivals, self._arrivals = self._arrivals, []
            for task, seq in arrivals:
                key = _MIXED if self.mixed else task
                group = self._groups.get(key)
                if group is None:
                    group = self._groups[key] = _Group(None)
                group.pending.append(seq)
            for task, group in list(self._groups.items()):
                try:
                    self._turn(task, group)
                except Exception as exc:  # noqa: BLE001 - every sequence of the group gets the error
                    for seq in group.seqs + group.pending:
                        self._finish(seq, None, error=exc)
                    group.seqs, group.pending, group.cache = [], [], None
                self._flush()
                if not group.seqs and not group.pending:
                    _release(group)
                    del self._groups[task]
            with self._cv:
                self.stats["kv_bytes"] = sum(cache_bytes(g.cache) for g in self._groups.values() if g.cache is not None)
                self._sync_counts()

    def _turn(self, key, group: _Group) -> None:
        """One turn of a group: newcomers join (prefill), then one decode step of the whole group."""
        import torch

        self._drop_finished(group)
        for s in group.pending:
            if s.cancelled.is_set():
                self._finish(s, "stop")
        newcomers = [s for s in group.pending if not s.done]
        group.pending = []
        newcomers, group.pending = self._within_max_tasks(key, group, newcomers)
        if key is not _MIXED and not newcomers and not group.seqs:
            _release(group)  # every task slot is taken: its sequences wait, holding nothing
            return
        if key is _MIXED:
            self._mixed_models(group, newcomers)
        elif group.model is None or not group.seqs:
            _release(group)
            try:
                held = self.lease(key, len(newcomers))  # the fold of a cold task happens here, on this thread
            except Exception as exc:  # noqa: BLE001 - the task cannot run: its newcomers get the error
                for s in newcomers:
                    self._finish(s, None, error=exc)
                return
            group.leases, group.model = {key: held}, held.model
        elif newcomers:
            group.leases[key].use(len(newcomers))
        if newcomers and group.cache is not None and not joinable(group.cache):
            group.pending = newcomers  # this cache cannot take rows: they start when the group empties
            newcomers = []
        if newcomers:
            from liedeploy.bank.row_dispatch import NotRowwise

            try:
                with torch.inference_mode():
                    self._prefill(group, newcomers)
            except NotRowwise:  # layers that do not take rows first: one batch per task from now on
                self.mixed = False
                for s in newcomers:
                    self._groups.setdefault(s.task, _Group(None)).pending.append(s)
                if not group.seqs:
                    _release(group)
            self._drop_finished(group)
            self._flush()  # first tokens out now, not after the step
        if group.seqs:
            with torch.inference_mode():
                self._step(group)
            self._drop_finished(group)

    def _within_max_tasks(self, key, group: _Group, newcomers: list) -> tuple:
        """``(newcomers that may start now, the ones that wait)`` under ``max_tasks``."""
        if self.max_tasks is None or not newcomers:
            return newcomers, []
        if key is _MIXED:
            held = {s.task for s in group.seqs} - {None}
        else:  # one group per task: the tasks of the other groups that hold rows
            held = {k for k, g in self._groups.items() if g is not group and g.seqs} - {None}
            if group.seqs or key is None:
                return newcomers, []
        start, wait = [], []
        for s in newcomers:
            if s.task is None or s.task in held or len(held) < self.max_tasks:
                if s.task is not None:
                    held.add(s.task)
                start.append(s)
            else:
                wait.append(s)
        return start, wait

    def _mixed_models(self, group: _Group, newcomers: list) -> None:
        """The replicas of every task in a mixed group (folding cold ones) and their view."""
        from liedeploy.bank.row_dispatch import MixedView

        needed = {s.task for s in group.seqs} | {s.task for s in newcomers}
        uses: dict = {}
        for s in newcomers:
            uses[s.task] = uses.get(s.task, 0) + 1
        for t, n in uses.items():
            if t in group.leases:
                group.leases[t].use(n)
        if needed == set(group.models) and group.model is not None:
            return
        models = {t: group.models[t] for t in needed if t in group.models}
        for t in set(group.leases) - needed:  # no row of it is left: its storage may be reused
            group.leases.pop(t).release()
        for t in needed - set(models):
            try:
                held = self.lease(t, uses.get(t, 0))  # the fold of a cold task happens here, on this thread
                group.leases[t], models[t] = held, held.model
            except Exception as exc:  # noqa: BLE001 - only this task's newcomers get the error
                for s in [s for s in newcomers if s.task == t]:
                    newcomers.remove(s)
                    self._finish(s, None, error=exc)
        group.models = models
        group.model = MixedView(self.lease(None, 0).model, models) if models else None

    def _rows(self, group: _Group, seqs: list) -> None:
        if hasattr(group.model, "set_rows"):
            group.model.set_rows([s.task for s in seqs])

    def _forward(self, model, ids, mask, cache):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{cache_kwarg(getattr(model, "model", model)): cache})
        cache = cache_of(out)
        if cache is None:
            raise RuntimeError(f"{type(model).__name__} returned no KV cache: generation needs a causal LM with one")
        return out.logits[:, -1, :].float(), cache

    def _prefill(self, group: _Group, seqs: list) -> None:
        import torch

        seqs = sorted(seqs, key=_task_order)
        width = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every prompt ends at the last column
            ids[i, width - len(s.ids):] = torch.tensor(s.ids, dtype=torch.long)
            mask[i, width - len(s.ids):] = 1
        device = model_device(group.model)
        ids, mask = ids.to(device), mask.to(device)
        self._rows(group, seqs)
        logits, cache = self._forward(group.model, ids, mask, None)
        last = self._choose(seqs, logits)
        if group.cache is None:
            group.cache, group.mask, group.last, group.seqs = cache, mask, last, list(seqs)
        else:
            self._join(group, cache, mask, last, seqs)
        for s, tok in zip(seqs, last.tolist()):
            self._emit(s, tok)

    def _join(self, group: _Group, cache, mask, last, seqs: list) -> None:
        import torch

        width = max(group.mask.shape[1], mask.shape[1])
        for old, new in zip(group.cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, width, 2), left_pad(new.keys, width, 2)], 0)
            old.values = torch.cat([left_pad(old.values, width, 2), left_pad(new.values, width, 2)], 0)
        group.mask = torch.cat([left_pad(group.mask, width, 1), left_pad(mask, width, 1)], 0)
        group.last = torch.cat([group.last, last])
        group.seqs.extend(seqs)
        self.stats["joins"] += len(seqs)
        order = sorted(range(len(group.seqs)), key=lambda i: _task_order(group.seqs[i]))
        if order != list(range(len(order))):  # rows of one task together, as the mixed view needs
            idx = torch.tensor(order, dtype=torch.long, device=group.mask.device)
            for layer in group.cache.layers:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
            group.mask, group.last = group.mask[idx], group.last[idx]
            group.seqs = [group.seqs[i] for i in order]

    def _step(self, group: _Group) -> None:
        import torch

        mask = torch.cat([group.mask, torch.ones((group.mask.shape[0], 1), dtype=torch.long, device=group.mask.device)], 1)
        self._rows(group, group.seqs)
        if joinable(group.cache):
            grow_in_place(group.cache)
        logits, group.cache = self._forward(group.model, group.last[:, None], mask, group.cache)
        group.mask = mask
        group.last = self._choose(group.seqs, logits)
        self.stats["steps"] += 1
        for s, tok in zip(group.seqs, group.last.tolist()):
            self._emit(s, tok)

    def _choose(self, seqs: list, logits):
        import torch

        tokens = logits.argmax(-1)
        for i, s in enumerate(seqs):
            if s.temperature > 0:
                from transformers import TemperatureLogitsWarper, TopPLogitsWarper

                scores = TemperatureLogitsWarper(s.temperature)(None, logits[i:i + 1])
                if s.top_p < 1.0:
                    scores = TopPLogitsWarper(s.top_p)(None, scores)
                probs = torch.softmax(scores, dim=-1)
                tokens[i] = torch.multinomial(probs.float().cpu(), 1, generator=s.generator)[0, 0]  # its own CPU generator
        return tokens

    def _drop_finished(self, group: _Group) -> None:
        """Rows whose sequence ended (or whose client left) leave the batch and its cache."""
        for s in group.seqs:
            if not s.done and s.cancelled.is_set():
                self._finish(s, "stop")
        keep = [i for i, s in enumerate(group.seqs) if not s.done]
        if len(keep) == len(group.seqs):
            return
        if not keep:
            group.seqs, group.cache, group.mask, group.last = [], None, None, None
            return
        import torch

        idx = torch.tensor(keep, dtype=torch.long, device=group.mask.device)
        mask = group.mask[idx]
        first = int((mask.sum(0) > 0).nonzero()[0, 0])  # columns that are padding in every row go too
        for layer in group.cache.layers:
            layer.keys = layer.keys[idx][:, :, first:]  # the next update copies them into new buffers
            layer.values = layer.values[idx][:, :, first:]
        group.mask, group.last = mask[:, first:], group.last[idx]
        group.seqs = [group.seqs[i] for i in keep]

    # -- per-sequence bookkeeping ------------------------------------------------------------------
    def _emit(self, s: Sequence, tok: int) -> None:
        if s.done:
            return
        now = time.monotonic()
        self.observe("ttft" if s.last_token is None else "itl", now - (s.last_token or s.submitted))
        s.last_token = now
        if tok in self.eos:
            self._finish(s, "stop")
            return
        self.stats["tokens"] += 1
        delta, reason = s.add_token(tok, self.tokenizer)
        if delta:
            self._post(s, delta)
        if reason:
            self._finish(s, reason)

    def _finish(self, s: Sequence, reason: Optional[str], error: Optional[BaseException] = None) -> None:
        if s.done:
            return
        rest = s.held_back(self.tokenizer) if error is None else ""
        if rest:  # a partial character held back: out now
            self._post(s, rest)
        s.done, s.reason = True, reason
        with self._cv:  # freed before the client hears the end, so its next request is admitted
            self._admitted -= 1
            self._reserved -= s.reserved
            self.stats["sequences"] += error is None
            self._sync_counts()
        self._post(s, error)  # None ends the stream; an exception is raised to the request

    def _post(self, s: Sequence, item) -> None:
        """Queue ``item`` for ``s``'s client; :meth:`_flush` hands a step's items over in one call per loop."""
        self._outbox.append((s, item))

    def _flush(self) -> None:
        """One ``call_soon_threadsafe`` per event loop for everything a step produced (not one per token)."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for s, item in self._outbox:
            by_loop.setdefault(s.loop, []).append((s.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is gone: nobody reads these sequences any more
                pass

    def _sync_counts(self) -> None:
        if threading.get_ident() == self._owner:  # only the engine thread walks its groups
            self._running = sum(len(g.seqs) for g in self._groups.values())
        self.stats["running"] = self._running
        self.stats["waiting"] = max(0, self._admitted - self._running)
        self.stats["kv_reserved_bytes"] = self._reserved
