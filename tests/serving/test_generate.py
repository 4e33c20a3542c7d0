"""`liedeploy serve --hf-model`: text generation for many Lie tasks over one base, through the
official openai client (streaming and not) and the KServe generate extension, against a real
server process on loopback. A tiny GPT-2 config with random weights and a tokenizer built here."""

import copy
import json
import socket
import time
import urllib.request

import pytest
import torch

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from liedeploy import load_adapter, merge_  # noqa: E402
from tests.conftest import _write_adapter  # noqa: E402
from tests.serving.helpers import ServerProcess  # noqa: E402
from tests.serving.server_farm import request  # noqa: E402

WORDS = [f"w{i}" for i in range(36)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + ["<eos>", "<pad>", "[UNK]", "<user>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
    return fast


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=128, bos_token_id=36,
                     eos_token_id=36, pad_token_id=37, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(str(d / "model"))
    _tokenizer().save_pretrained(str(d / "model"))
    tasks = d / "tasks"
    tasks.mkdir()
    refs = {"base": model}
    for i, t in enumerate(("poet", "coder")):
        p = _write_adapter(model, tasks / f"{t}.safetensors", ["c_attn", "c_fc"], r=4, std=0.3, seed=10 + i,
                           randomize_A=True)
        refs[t] = merge_(load_adapter(copy.deepcopy(model), p)).eval()
    with ServerProcess(["--hf-model", str(d / "model"), "--adapters", str(tasks), "--max-sequences", "8",
                        "--max-new-tokens", "64"]) as srv:
        yield {"srv": srv, "refs": refs, "tok": _tokenizer()}


def _greedy(lm, task, prompt, n):
    tok = lm["tok"]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = lm["refs"][task].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                        do_sample=False, pad_token_id=37)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new)


def _client(lm):
    return openai.OpenAI(base_url=lm["srv"].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_base_and_every_task(lm):
    assert sorted(m.id for m in _client(lm).models.list().data) == ["base", "coder", "poet"]


@pytest.mark.parametrize("task", ["base", "poet", "coder"])
def test_greedy_completion_equals_the_merged_model_token_for_token(lm, task):
    prompt = "w1 w2 w3 w4"
    want, n = _greedy(lm, task, prompt, 12)
    r = _client(lm).completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == n


def test_tasks_generate_differently(lm):
    c = _client(lm)
    texts = {t: c.completions.create(model=t, prompt="w5 w6", max_tokens=10, temperature=0).choices[0].text
             for t in ("base", "poet", "coder")}
    assert len(set(texts.values())) == 3


def test_streaming_gives_the_same_text_in_chunks(lm):
    c = _client(lm)
    whole = c.completions.create(model="poet", prompt="w7 w8 w9", max_tokens=16, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="poet", prompt="w7 w8 w9", max_tokens=16, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(chunks) > 2


def test_chat_completion_uses_the_chat_template_streaming_or_not(lm):
    c = _client(lm)
    msgs = [{"role": "user", "content": "w3 w4"}]
    want, _ = _greedy(lm, "coder", "<user> w3 w4", 10)
    r = c.chat.completions.create(model="coder", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    streamed = "".join((ch.choices[0].delta.content or "") for ch in
                       c.chat.completions.create(model="coder", messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert streamed == want


def test_a_seed_makes_sampling_reproducible(lm):
    c = _client(lm)
    a, b = (c.completions.create(model="poet", prompt="w1", max_tokens=12, temperature=1.0, seed=7).choices[0].text
            for _ in range(2))
    assert a == b


def test_stop_strings_cut_the_text(lm):
    c = _client(lm)
    whole = c.completions.create(model="base", prompt="w1 w2", max_tokens=20, temperature=0).choices[0].text
    words = whole.split()
    if len(words) < 3:
        pytest.skip("the random model ended early")
    stop = words[2]
    r = c.completions.create(model="base", prompt="w1 w2", max_tokens=20, temperature=0, stop=[stop])
    assert stop not in r.choices[0].text and whole.startswith(r.choices[0].text) and r.choices[0].finish_reason == "stop"


def test_kserve_generate_and_generate_stream(lm):
    url = lm["srv"].url
    want, _ = _greedy(lm, "poet", "w2 w4", 8)
    body = json.dumps({"text_input": "w2 w4", "parameters": {"max_tokens": 8, "temperature": 0}}).encode()
    status, _, out = request(f"{url}/v2/models/poet/generate", "POST", body, {"Content-Type": "application/json"})
    assert status == 200 and json.loads(out)["text_output"] == want
    status, _, out = request(f"{url}/v2/models/poet/generate_stream", "POST", body, {"Content-Type": "application/json"})
    parts = [json.loads(line[6:])["text_output"] for line in out.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and "".join(parts) == want


@pytest.mark.parametrize("payload, status, words", [
    ({"model": "nope", "prompt": "w1"}, 404, "unknown task 'nope'"),
    ({"model": "poet", "prompt": "w1", "max_tokens": 100000}, 400, "'max_tokens' must be between 1 and 64"),
    ({"model": "poet", "prompt": "w1", "temperature": -1}, 400, "'temperature' must be between"),
    ({"model": "poet", "prompt": "w1", "n": 2}, 400, "only n=1"),
    ({"model": "poet", "prompt": ""}, 400, "'prompt' must be a non-empty string"),
    ({"model": "poet", "prompt": " ".join(["w1"] * 3000)}, 400, "at most 2048 are served"),
    ({"model": "poet", "prompt": " ".join(["w1"] * 100), "max_tokens": 64}, 400,
     "plus max_tokens (64) exceed the model's context of 128 tokens"),
])
def test_bad_requests_get_openai_errors(lm, payload, status, words):
    code, _, body = request(f"{lm['srv'].url}/v1/completions", "POST", json.dumps(payload).encode(),
                          {"Content-Type": "application/json"})
    err = json.loads(body)["error"]
    assert code == status and words in err["message"] and err["code"] == status


def test_metrics_count_generated_tokens(lm):
    c = _client(lm)
    before = _tokens(lm)
    r = c.completions.create(model="coder", prompt="w1", max_tokens=5, temperature=0)
    assert _tokens(lm) == before + r.usage.completion_tokens


def _tokens(lm):
    from prometheus_client.parser import text_string_to_metric_families

    text = request(f"{lm['srv'].url}/metrics")[2].decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "liedeploy_generated_tokens_total":
                return s.value
    raise KeyError("liedeploy_generated_tokens_total")


def test_a_client_leaving_mid_stream_frees_its_slot(lm):
    host, port = lm["srv"].hostport.split(":")
    body = json.dumps({"model": "poet", "prompt": "w1", "max_tokens": 64, "temperature": 0, "stream": True}).encode()
    for _ in range(9):  # more streams than the 8 slots, each abandoned after its first bytes
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert s.recv(64)
    deadline = time.monotonic() + 20
    while True:
        req = urllib.request.Request(f"{lm['srv'].url}/v1/completions", method="POST", data=json.dumps(
            {"model": "poet", "prompt": "w1", "max_tokens": 4, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
                break
        except urllib.error.HTTPError as e:
            assert e.code == 503 and time.monotonic() < deadline
            time.sleep(0.2)


def test_the_tensor_api_serves_logits_too(lm):
    ids = [[1, 2, 3]]
    body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": ids[0]},
                                  {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]}]})
    status, _, out = request(f"{lm['srv'].url}/v2/models/poet/infer", "POST", body.encode(),
                           {"Content-Type": "application/json"})
    outs = {o["name"]: o for o in json.loads(out)["outputs"]}
    assert status == 200 and outs["logits"]["shape"] == [1, 3, 40]
    with torch.no_grad():
        want = lm["refs"]["poet"](torch.tensor(ids)).logits
    got = torch.tensor(outs["logits"]["data"]).reshape(1, 3, 40)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_concurrent_greedy_requests_share_a_batch_and_keep_their_own_tokens(lm):
    import concurrent.futures as cf

    jobs = [("poet", "w1 w2 w3"), ("poet", "w4"), ("poet", "w5 w6 w7 w8 w9 w10"), ("poet", "w11 w12"),
            ("coder", "w1 w2 w3"), ("coder", "w13 w14 w15 w16"), ("base", "w2 w3")]
    c = _client(lm)

    def one(job):
        task, prompt = job
        return c.completions.create(model=task, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(one, jobs))
    for (task, prompt), text in zip(jobs, got):
        assert text == _greedy(lm, task, prompt, 10)[0], (task, prompt)


@pytest.fixture(scope="module")
def tight(lm, tmp_path_factory):
    """The same tasks on a server whose cache holds one folded task (constant eviction), that decodes
    one task at a time beside the base (--max-batch-tasks 1: the others wait) and whose KV budget
    holds 100 tokens."""
    srv = lm["srv"]
    model_dir = srv.args[srv.args.index("--hf-model") + 1]
    tasks = srv.args[srv.args.index("--adapters") + 1]
    per = _kv_per_token(lm)
    with ServerProcess(["--hf-model", model_dir, "--adapters", tasks, "--max-sequences", "8", "--max-new-tokens", "64",
                        "--cache-bytes", "70K", "--max-kv-bytes", str(100 * per), "--max-batch-tasks", "1"]) as s:
        yield {"srv": s, "refs": lm["refs"], "tok": lm["tok"], "per": per}


def _kv_per_token(lm):
    cfg = lm["refs"]["base"].config
    return 2 * cfg.n_layer * cfg.n_embd * 4


def test_eight_streams_over_three_tasks_with_constant_eviction_match_their_merged_models(tight):
    import concurrent.futures as cf

    jobs = [(("poet", "coder", "base")[i % 3], " ".join(f"w{(i * 5 + k) % 30}" for k in range(1 + i % 4)))
            for i in range(8)]
    c = _client(tight)

    def one(job):
        task, prompt = job
        chunks = c.completions.create(model=task, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in chunks)

    for _ in range(2):  # 8 x (4 + 8) tokens fit the KV budget of 100
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(one, jobs))
        mismatches = [(t, p) for (t, p), text in zip(jobs, got) if text != _greedy(tight, t, p, 8)[0]]
        assert mismatches == []
    assert _metric(tight, "liedeploy_cache_evictions_total") > 0  # one task fits: tasks kept evicting
    assert any("at most 1 task(s) decoding at once" in line for line in tight["srv"].lines)


def test_kv_budget_overflow_is_503_with_retry_after_and_a_request_over_the_budget_is_400(tight):
    url = tight["srv"].url + "/v1/completions"
    hdr = {"Content-Type": "application/json"}
    too_big = json.dumps({"model": "poet", "prompt": "w1 " * 50, "max_tokens": 64, "temperature": 0}).encode()
    status, _, body = request(url, "POST", too_big, hdr)
    assert status == 400 and "--max-kv-bytes" in json.loads(body)["error"]["message"]
    import concurrent.futures as cf

    each = json.dumps({"model": "poet", "prompt": "w1 " * 30, "max_tokens": 64, "temperature": 0}).encode()
    with cf.ThreadPoolExecutor(6) as ex:  # each reserves 94 of the 100 tokens: one at a time fits
        answers = list(ex.map(lambda _: request(url, "POST", each, hdr), range(6)))
    codes = sorted(a[0] for a in answers)
    assert codes[0] == 200 and codes[-1] == 503 and set(codes) == {200, 503}, codes
    for status, headers, body in answers:
        if status == 503:
            assert "KV cache budget" in json.loads(body)["error"]["message"]
            assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) >= 1
    assert request(url, "POST", each, hdr)[0] == 200  # the budget came back


def test_generation_metrics_report_latency_sequences_and_kv_bytes(tight):
    _client(tight).completions.create(model="poet", prompt="w1 w2", max_tokens=6, temperature=0)
    assert _metric(tight, "liedeploy_time_to_first_token_seconds_count") >= 1
    assert _metric(tight, "liedeploy_inter_token_seconds_count") >= 5
    assert _metric(tight, "liedeploy_decode_steps_total") >= 5
    for name in ("liedeploy_generation_running", "liedeploy_generation_waiting", "liedeploy_kv_cache_bytes",
                 "liedeploy_kv_cache_reserved_bytes"):
        assert _metric(tight, name) == 0  # nothing generating now


def _metric(lm, name):
    from prometheus_client.parser import text_string_to_metric_families

    text = request(f"{lm['srv'].url}/metrics")[2].decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


@pytest.mark.parametrize("flag", ["--max-batch-tasks", "--max-sequences"])
def test_generation_bounds_below_one_are_usage_errors(tmp_path, capsys, flag):
    from liedeploy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--hf-model", str(tmp_path), "--adapters", str(tmp_path), flag, "0"])
    assert e.value.code == 2 and f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_the_start_up_line_says_how_mixed_decode_steps_run(lm):
    from liedeploy.core import native

    line = next(ln for ln in lm["srv"].lines if "mixed decode steps:" in ln)
    want = "row-segment kernel" if native.available() else "one call per task"
    assert want in line, line
