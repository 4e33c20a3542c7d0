"""Text exports: named inputs passed by keyword with dynamic batch and sequence, the model's output
names, and a decoder with KV cache (onnxruntime-genai's model builder) whose greedy generation
equals the task's merged model in torch, checked here independently of the exporter's own check."""

import copy
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from liedeploy import load_adapter, merge_  # noqa: E402
from liedeploy.cli import main  # noqa: E402
from tests.conftest import _write_adapter  # noqa: E402
from tests.serving.test_generate import _tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=36, pad_token_id=37,
                      bos_token_id=36, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(d / "model"))
    _tokenizer().save_pretrained(str(d / "model"))
    task = _write_adapter(model, d / "poet.safetensors", ["q_proj", "v_proj", "gate_proj", "down_proj"], r=4, std=0.3,
                          seed=8, randomize_A=True)
    merged = merge_(load_adapter(copy.deepcopy(model), task)).eval()
    return {"dir": str(d / "model"), "task": task, "merged": merged, "tmp": d}


def test_named_inputs_export_with_a_batch_1_example_runs_any_batch_and_length(llama, capsys):
    out = str(llama["tmp"] / "poet.onnx")
    code = main(["export", "--onnx", "--hf-model", llama["dir"], "--adapter", llama["task"], "--input",
                 "input_ids:INT64:1,-1", "--input", "attention_mask:INT64:1,-1", "--dynamic-batch", "-o", out])
    assert code == 0, capsys.readouterr().err
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("input_ids", ["batch", "sequence"]),
                                                              ("attention_mask", ["batch", "sequence"])]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    ids = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = llama["merged"](input_ids=ids, attention_mask=mask, use_cache=False).logits.double().numpy()
    rows = [1, 2]  # fully unmasked rows: fp32 against the merged model, to fp32 rounding of a small net
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0, 4:], want[0, 4:], rtol=1e-4, atol=1e-4)


def test_generation_export_generates_the_merged_models_greedy_tokens(llama, capsys):
    og = pytest.importorskip("onnxruntime_genai")
    out = str(llama["tmp"] / "poet-gen")
    code = main(["export", "--onnx", "--hf-model", llama["dir"], "--adapter", llama["task"], "-o", out])
    assert code == 0, capsys.readouterr().err
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "export.report.json"} <= set(os.listdir(out))
    sess = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names[:2] == ["input_ids", "attention_mask"] and "past_key_values.0.key" in names
    assert sess.get_inputs()[0].shape == ["batch_size", "sequence_length"]
    model = og.Model(out)
    for ids in ([3, 1, 4, 1, 5, 9, 2, 6], [7, 7]):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 32, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([ids], dtype=np.int32))
        got = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        with torch.no_grad():
            x = torch.tensor([ids])
            want = llama["merged"].generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=32,
                                            do_sample=False, pad_token_id=37)[0, len(ids):].tolist()
        assert got == want
    report = json.load(open(os.path.join(out, "export.report.json")))
    assert report["ok"] and report["greedy_tokens"] == 32


def test_generation_export_of_an_unsupported_architecture_says_what_to_do(tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)).save_pretrained(str(tmp_path / "m"))
    _tokenizer().save_pretrained(str(tmp_path / "m"))
    code = main(["export", "--onnx", "--hf-model", str(tmp_path / "m"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "not currently supported" in err and "--input NAME:DATATYPE:SHAPE" in err
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("extra, words", [
    (["--model", "x.y:z"], "--hf-model replaces --model and --weights"),
    (["--input", "input_ids:INT64:1,-1", "--input-shape", "1,8"], "either --input-shape"),
    (["--input", "input_ids:INT64:1,-1", "--trt"], "--input (named inputs) applies to the --onnx export"),
    (["--input", "input_ids:NOPE:1,-1"], "datatype NOPE"),
    (["--dynamic-batch"], "--dynamic-batch does not apply to the generation export"),
])
def test_text_export_usage_errors(llama, capsys, extra, words):
    argv = ["export", "--onnx", "--hf-model", llama["dir"], "-o", str(llama["tmp"] / "never")] + extra
    if "--trt" in extra:
        argv.remove("--onnx")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not os.path.exists(llama["tmp"] / "never")


def test_export_without_a_model_names_both_ways(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["export", "--onnx", "--input-shape", "1,3", "-o", str(tmp_path / "m.onnx")])
    assert e.value.code == 2 and "--model PKG.MOD:FACTORY with --weights" in capsys.readouterr().err
