"""The continuous-batching engine of text generation, in process: sequences that join a running
batch between steps keep the tokens of their task's merged model decoding alone (Llama with rotary
positions and left padding, GPT-2 with learned positions), sampled and greedy rows share a batch,
clients that leave free their row, and the KV-cache budget admits, refuses and frees."""

import asyncio
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from liedeploy import AdapterBank, load_adapter, merge_  # noqa: E402
from liedeploy.serving.errors import BadRequest, Unavailable  # noqa: E402
from liedeploy.serving.generate import GenerationParams, Generator  # noqa: E402
from tests.conftest import _write_adapter  # noqa: E402
from tests.serving.test_generate import _tokenizer  # noqa: E402

EOS = 36


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, pad_token_id=37,
                      bos_token_id=EOS, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # EOS's logit is 0, below the best of 39 others: sequences run to max_tokens
        model.lm_head.weight[EOS] = 0
    return model, ["q_proj", "v_proj", "gate_proj"]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=256, bos_token_id=EOS,
                     eos_token_id=EOS, pad_token_id=37, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] = 0
    return model, ["c_attn", "c_fc"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    model, targets = {"llama": _llama, "gpt2": _gpt2}[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    paths, refs = {}, {None: model}
    for i, t in enumerate(("a", "b")):
        paths[t] = _write_adapter(model, d / f"{t}.safetensors", targets, r=4, std=0.3, seed=20 + i, randomize_A=True)
        refs[t] = merge_(load_adapter(copy.deepcopy(model), paths[t])).eval()
    return {"model": model, "paths": paths, "refs": refs, "tok": _tokenizer()}


def _bank(setup, **kw):
    return AdapterBank(copy.deepcopy(setup["model"]), adapters=setup["paths"], **kw)


def _want(setup, task, ids, n):
    with torch.no_grad():
        out = setup["refs"][task].generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                           dtype=torch.long), max_new_tokens=n, do_sample=False, pad_token_id=37)
    return out[0, len(ids):].tolist()


def _p(n, temperature=0.0, seed=None):
    return GenerationParams(max_tokens=n, temperature=temperature, top_p=1.0, seed=seed, stop=[])


async def _until(cond, seconds=30.0):
    for _ in range(int(seconds / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


def test_sequences_join_a_running_batch_and_keep_their_merged_models_tokens(setup):
    jobs = [("a", [1, 2, 3], 40), ("a", [4, 5, 6, 7, 8, 9, 10], 12), ("a", [11], 20), ("b", [2, 3], 25),
            (None, [5, 6, 7, 8], 15), ("a", [12, 13, 14, 15, 16, 17, 18, 19, 20], 10)]

    async def run():
        gen = Generator(_bank(setup), setup["tok"], max_sequences=8, max_new_tokens=64)
        first = gen.start(*jobs[0][:2], _p(jobs[0][2]))
        await _until(lambda: len(first.tokens) >= 5)  # the others arrive while 'a' is decoding
        rest = [gen.start(t, ids, _p(n)) for t, ids, n in jobs[1:3]]
        await _until(lambda: len(rest[0].tokens) >= 3)
        rest += [gen.start(t, ids, _p(n)) for t, ids, n in jobs[3:]]
        outs = await asyncio.gather(*(gen.complete(s) for s in [first] + rest))
        await _until(lambda: gen.stats["kv_bytes"] == 0)
        gen.engine.close()
        return gen, [first] + rest, outs

    gen, seqs, outs = asyncio.run(run())
    assert gen.stats["joins"] >= 3  # sequences of 'a' joined its batch while it ran
    for (task, ids, n), seq, out in zip(jobs, seqs, outs):
        assert seq.tokens == _want(setup, task, ids, n), (task, ids)
        assert out["completion_tokens"] == n and out["finish_reason"] == "length"
    assert gen.stats["running"] == 0 and gen.stats["kv_reserved_bytes"] == 0 and gen.stats["kv_bytes"] == 0


def test_sampled_rows_share_the_batch_and_a_seed_reproduces_them(setup):
    async def run():
        gen = Generator(_bank(setup), setup["tok"], max_sequences=8, max_new_tokens=64)
        seqs = [gen.start("b", [1, 2, 3], _p(16, 1.0, seed=5)), gen.start("b", [7, 8], _p(16)),
                gen.start("b", [1, 2, 3], _p(16, 1.0, seed=5)), gen.start("b", [1, 2, 3], _p(16, 1.0, seed=6))]
        await asyncio.gather(*(gen.complete(s) for s in seqs))
        alone = gen.start("b", [1, 2, 3], _p(16, 1.0, seed=5))
        await gen.complete(alone)
        gen.engine.close()
        return seqs, alone

    seqs, alone = asyncio.run(run())
    assert seqs[1].tokens == _want(setup, "b", [7, 8], 16)  # greedy next to sampled rows
    assert seqs[0].tokens == seqs[2].tokens == alone.tokens  # same seed, batched or alone
    assert seqs[0].tokens != seqs[3].tokens


def test_a_cancelled_sequence_leaves_at_the_next_step_and_frees_its_reservation(setup):
    async def run():
        gen = Generator(_bank(setup), setup["tok"], max_sequences=4, max_new_tokens=200)
        long = gen.start("a", [1, 2], _p(200))
        other = gen.start("a", [3, 4, 5], _p(30))
        await _until(lambda: len(long.tokens) >= 3)
        long.cancelled.set()
        out = await gen.complete(other)
        await _until(lambda: long.done)
        await _until(lambda: gen.stats["kv_reserved_bytes"] == 0)
        gen.engine.close()
        return long, other, out

    long, other, out = asyncio.run(run())
    assert len(long.tokens) < 200 and long.reason == "stop"
    assert other.tokens == _want(setup, "a", [3, 4, 5], 30) and out["finish_reason"] == "length"


def test_the_kv_budget_admits_refuses_and_frees(setup):
    async def run():
        bank = _bank(setup)
        probe = Generator(bank, setup["tok"], max_sequences=8)
        per = probe.kv_per_token
        probe.engine.close()
        gen = Generator(bank, setup["tok"], max_sequences=8, max_new_tokens=64, max_kv_bytes=60 * per)
        with pytest.raises(BadRequest, match=r"needs \d+ bytes of KV cache .*--max-kv-bytes"):
            gen.start("a", [1] * 10, _p(60))  # alone more than the whole budget: 400
        held = gen.start("a", [1, 2, 3, 4], _p(40))  # reserves 44 of 60 tokens
        with pytest.raises(Unavailable, match="KV cache budget"):
            gen.start("b", [1, 2, 3, 4, 5], _p(20))  # 25 more do not fit now: 503
        assert gen.stats["kv_reserved_bytes"] == 44 * per
        await gen.complete(held)
        again = gen.start("b", [1, 2, 3, 4, 5], _p(20))  # freed: admitted
        await gen.complete(again)
        gen.engine.close()
        return per, again

    per, again = asyncio.run(run())
    assert per > 0 and len(again.tokens) == 20


def test_kv_bytes_per_token_matches_the_models_cache(setup):
    from liedeploy.serving.kv_cache import kv_bytes_per_token

    c = setup["model"].config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = c.hidden_size // c.num_attention_heads
    assert kv_bytes_per_token(setup["model"]) == 2 * c.num_hidden_layers * heads * head_dim * 4


def test_tasks_share_one_mixed_batch_and_keep_their_tokens(setup):
    jobs = [("a", [1, 2, 3]), ("b", [4, 5]), (None, [6, 7, 8, 9]), ("a", [10]), ("b", [11, 12, 13])]

    async def run(mixed):
        gen = Generator(_bank(setup), setup["tok"], max_sequences=8, max_new_tokens=64)
        gen.engine.mixed = mixed
        seqs = [gen.start(t, ids, _p(12)) for t, ids in jobs]
        await asyncio.gather(*(gen.complete(s) for s in seqs))
        steps = gen.stats["steps"]
        gen.engine.close()
        return [s.tokens for s in seqs], steps

    mixed, mixed_steps = asyncio.run(run(True))
    alone, alone_steps = asyncio.run(run(False))
    for (task, ids), got in zip(jobs, mixed):
        assert got == _want(setup, task, ids, 12), (task, ids)
    assert mixed == alone
    assert mixed_steps < alone_steps  # one step serves every task's rows


def test_mixed_view_runs_each_tasks_rows_through_its_own_layers_and_refuses_flattened_rows():
    from torch import nn

    from liedeploy.bank.replica import build_replica
    from liedeploy.bank.row_dispatch import MixedView, NotRowwise

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    reps = {"x": build_replica(base, {"0.weight": torch.randn(6, 4)}),
            "y": build_replica(base, {"2.weight": torch.randn(3, 6), "2.bias": torch.randn(3)}), None: base}
    view = MixedView(base, reps)
    assert view.paths == ["0", "2"]
    rows = torch.randn(5, 4)
    tasks = ["x", "x", "y", None, None]
    view.set_rows(tasks)
    with torch.no_grad():
        got = view(rows)
        want = torch.cat([reps["x"](rows[:2]), reps["y"](rows[2:3]), base(rows[3:])])
        r64 = {t: copy.deepcopy(m).double() for t, m in reps.items()}
        ref = torch.cat([r64["x"](rows[:2].double()), r64["y"](rows[2:3].double()), r64[None](rows[3:].double())])
        # plain Linear layers at a few rows per task: the row-segment kernel where it builds (float32
        # rounding in its own order: within 1e-6 of float64 here), one call per task elsewhere
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        f64 = {t: (copy.deepcopy(r).double() if r is not base else None) for t, r in reps.items()}
        dbase = copy.deepcopy(base).double()
        f64[None] = dbase
        dview = MixedView(dbase, f64)  # float64: no kernel, one call per task, bit for bit
        dview.set_rows(tasks)
        xd = rows.double()
        torch.testing.assert_close(dview(xd), torch.cat([f64["x"](xd[:2]), f64["y"](xd[2:3]), dbase(xd[3:])]),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="together"):
        view.set_rows(["x", "y", "x"])
    flat = nn.Sequential(nn.Flatten(0, 1), nn.Linear(4, 2)).eval()
    fv = MixedView(flat, {"x": build_replica(flat, {"1.weight": torch.randn(2, 4)}), None: flat})
    fv.set_rows(["x", None])
    with pytest.raises(NotRowwise, match="first axis"):
        fv(torch.randn(2, 3, 4))


class _FlatOut(dict):
    @property
    def logits(self):
        return self["logits"]


class _Flattening(torch.nn.Module):
    """A toy causal LM whose adapted layer takes batch and sequence flattened together (as MoE
    routers do): not row-wise, so the engine must fall back to one batch per task."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 40)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        from transformers import DynamicCache

        h = self.emb(input_ids)
        b, t, d = h.shape
        h = self.mix(h.reshape(b * t, d)).reshape(b, t, d)
        cache = past_key_values if past_key_values is not None else DynamicCache()
        k, v = cache.update(h[:, None], h[:, None], 0)
        mask = (attention_mask if attention_mask is not None else torch.ones(b, k.shape[2], dtype=torch.long))
        m = mask[:, None, :, None].to(h.dtype)
        ctx = (v * m).sum(2) / m.sum(2)
        return _FlatOut(logits=self.head(ctx + h[:, -1:]), past_key_values=cache)


def test_layers_that_flatten_rows_fall_back_to_one_batch_per_task(tmp_path):
    torch.manual_seed(1)
    model = _Flattening().eval()
    paths = {t: _write_adapter(model, tmp_path / f"{t}.safetensors", ["mix", "head"], r=2, std=0.5, seed=i,
                               randomize_A=True) for i, t in enumerate(("a", "b"))}
    jobs = [("a", [1, 2, 3]), ("b", [4, 5]), (None, [6, 7, 8, 9]), ("a", [10, 11])]

    async def run(mixed):
        gen = Generator(AdapterBank(copy.deepcopy(model), adapters=paths), _tokenizer(), max_sequences=8,
                        max_new_tokens=16)
        gen.engine.mixed = mixed
        seqs = [gen.start(t, ids, _p(6)) for t, ids in jobs]
        await asyncio.gather(*(gen.complete(s) for s in seqs))
        gen.engine.close()
        return [s.tokens for s in seqs], gen.engine.mixed

    got, still_mixed = asyncio.run(run(True))
    want, _ = asyncio.run(run(False))
    assert not still_mixed and got == want and all(len(t) == 6 for t in got)


def test_streamed_text_equals_the_full_decode_with_characters_split_across_byte_tokens():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from liedeploy.serving.decode_engine import DecodeEngine, Sequence

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(["plain words here"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<eos>")
    text = "héllo wörld 日本語 🙂 plain words"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # characters split across tokens
    engine = DecodeEngine(tok, lambda t: None, max_sequences=1, max_kv_bytes=10**9, kv_per_token=1, thread=False)
    loop = asyncio.new_event_loop()
    try:
        seq = Sequence(ids[:1], _p(len(ids)), loop)
        for t in ids:
            engine._emit(seq, t)
    finally:
        loop.close()
    deltas = [item for s, item in engine._outbox if isinstance(item, str)]
    assert "".join(deltas) == tok.decode(ids) == text and seq.text == text
    assert not any("\ufffd" in d for d in deltas)


def test_growing_cache_layers_hold_what_concatenation_would():
    from liedeploy.serving.kv_cache import grow_in_place, joinable

    g = torch.Generator().manual_seed(0)
    plain, grown = (transformers.DynamicCache() for _ in range(2))
    first = (torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g))
    for c in (plain, grown):
        c.update(*first, 0)
    assert joinable(grown)
    grow_in_place(grown)
    for i in range(80):  # past the 64 columns of headroom, with rows dropped on the way
        if i == 30:
            for c in (plain, grown):
                c.layers[0].keys, c.layers[0].values = c.layers[0].keys[[0, 2]], c.layers[0].values[[0, 2]]
        rows = plain.layers[0].keys.shape[0]
        step = (torch.randn(rows, 2, 1, 4, generator=g), torch.randn(rows, 2, 1, 4, generator=g))
        for c in (plain, grown):
            k, v = c.update(*step, 0)
        torch.testing.assert_close(k, plain.layers[0].keys, rtol=0, atol=0)
        torch.testing.assert_close(grown.layers[0].values, plain.layers[0].values, rtol=0, atol=0)
    assert grown.get_seq_length() == plain.get_seq_length() == 85


def test_tasks_the_batch_no_longer_holds_give_their_storage_back(setup):
    """The engine leases each task's replica while rows of it run, so a small cache recycles storage."""
    probe = _bank(setup)
    probe.prefetch("a")
    one_task = probe.cached_bytes

    async def run():
        bank = _bank(setup, cache_bytes=one_task)  # a fold of one task evicts the other
        gen = Generator(bank, setup["tok"], max_sequences=8, max_new_tokens=64)
        got = []
        for task in ("a", "b", "a", "b"):  # waves: the batch holds one task at a time
            seqs = [gen.start(task, ids, _p(6)) for ids in ([1, 2, 3], [4, 5])]
            await asyncio.gather(*(gen.complete(s) for s in seqs))
            got.append((task, [s.tokens for s in seqs]))
        gen.engine.close()
        return bank, got

    bank, got = asyncio.run(run())
    for task, tokens in got:
        assert tokens == [_want(setup, task, [1, 2, 3], 6), _want(setup, task, [4, 5], 6)]
    assert bank.stats["evictions"] >= 3
    assert bank.stats["recycled"] > 0  # released replicas' storage went into later folds


@pytest.mark.parametrize("mixed", [True, False])
def test_max_tasks_bounds_the_tasks_held_at_once_and_the_others_wait(setup, mixed):
    jobs = [("a", [1, 2, 3]), ("b", [4, 5]), ("a", [6]), ("b", [7, 8, 9]), (None, [10, 11])]
    bank = _bank(setup)
    held, peak = set(), [0]
    lease = bank.lease

    class Watched:  # the bank's lease, watched: which tasks are held at once
        def __init__(self, task, uses):
            self.inner, self.task = lease(task, uses), task
            self.model, self.use = self.inner.model, self.inner.use
            if task is not None:
                held.add(id(self))
                peak[0] = max(peak[0], len(held))

        def release(self):
            held.discard(id(self))
            self.inner.release()

    def counting(task, uses=1):
        return Watched(task, uses)

    bank.lease = counting

    async def run(max_tasks):
        held.clear()
        peak[0] = 0
        gen = Generator(bank, setup["tok"], max_sequences=8, max_new_tokens=64, max_batch_tasks=max_tasks)
        gen.engine.mixed = mixed
        seqs = [gen.start(t, ids, _p(10)) for t, ids in jobs]
        await asyncio.gather(*(gen.complete(s) for s in seqs))
        await _until(lambda: gen.stats["running"] == 0 and not held)
        gen.engine.close()
        return [s.tokens for s in seqs], peak[0]

    bounded, bounded_peak = asyncio.run(run(1))
    free, free_peak = asyncio.run(run(None))
    assert bounded_peak == 1 and free_peak == 2  # one task at a time (the base is not counted)
    for (task, ids), got in zip(jobs, bounded):
        assert got == _want(setup, task, ids, 10), (task, ids)
    assert bounded == free


@pytest.mark.parametrize("mixed", [True, False])
def test_a_task_that_cannot_be_folded_fails_its_requests_and_no_other(setup, mixed):
    from liedeploy import LieError

    bank = _bank(setup)
    lease = bank.lease

    def failing(task, uses=1):
        if task == "b":
            raise LieError("b cannot be folded")
        return lease(task, uses)

    bank.lease = failing

    async def run():
        gen = Generator(bank, setup["tok"], max_sequences=8, max_new_tokens=64)
        gen.engine.mixed = mixed
        seqs = [gen.start(t, ids, _p(6)) for t, ids in (("a", [1, 2]), ("b", [3, 4]))]
        outs = await asyncio.wait_for(asyncio.gather(*(gen.complete(s) for s in seqs), return_exceptions=True), 60)
        gen.engine.close()
        return seqs, outs

    seqs, outs = asyncio.run(run())
    assert seqs[0].tokens == _want(setup, "a", [1, 2], 6)
    assert isinstance(outs[1], LieError) and "b cannot be folded" in str(outs[1])
