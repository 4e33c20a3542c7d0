"""The NLP user's path: training transformers models, mixed-task batches with keyword inputs on a
causal LM, and PEFT adapters with heads (SEQ_CLS, CAUSAL_LM) converted both ways, checked against
PEFT's own forward. Tiny GPT-2 configs with random weights (nothing downloads)."""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from liedeploy import AdapterBank, LieConfig, apply_adapters_, load_adapter, save_adapter  # noqa: E402
from liedeploy.train import train_adapters  # noqa: E402
from tests.conftest import save_state_dict  # noqa: E402


def _gpt2_config(**kw):
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, tie_word_embeddings=False, **kw)


def _causal_lm(seed=0):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(_gpt2_config()).eval()


def test_train_adapters_on_a_causal_lm_with_collator_batches(tmp_path):
    model = apply_adapters_(_causal_lm(), LieConfig(r=4, targets=["c_attn", "c_fc"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (16, 8), generator=g)
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 8, dtype=torch.long),
                "labels": ids[i:i + 4]} for i in range(0, 16, 4)]
    losses = train_adapters(model, batches, epochs=4, lr=2e-2, device="cpu", checkpoint=str(tmp_path / "t.safetensors"))
    assert losses[-1] < losses[0]
    assert os.path.exists(tmp_path / "t.safetensors")


def test_train_adapters_takes_logits_of_a_model_output_with_targets():
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(_gpt2_config(num_labels=3)).eval()
    model = apply_adapters_(model, LieConfig(r=4, targets=["c_attn"], modules_to_save=["score"]))
    x = torch.randint(1, 40, (8, 6))
    y = torch.randint(0, 3, (8,))
    losses = train_adapters(model, [(x, y)] * 3, epochs=3, lr=2e-2, device="cpu")
    assert losses[-1] < losses[0]


def test_forward_mixed_with_keyword_inputs_on_a_causal_lm(tmp_path, write_adapter):
    base = _causal_lm()
    paths = {t: write_adapter(base, tmp_path / f"{t}.safetensors", ["c_attn"], seed=i, std=0.3) for i, t in
             enumerate("ab")}
    bank = AdapterBank(copy.deepcopy(base), adapters=paths)
    ids = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 6, dtype=torch.long)
    tasks = ["a", "b", None, "a"]
    got = bank.forward_mixed(tasks=tasks, input_ids=ids, attention_mask=mask).logits
    for i, t in enumerate(tasks):
        want = bank(task=t, input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], use_cache=False).logits
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def _peft_round_trip(tmp_path, base, task_type, inputs):
    """PEFT HiRA (with its modules_to_save) -> Lie -> PEFT; forwards compared with PEFT's."""
    peft = pytest.importorskip("peft")
    from liedeploy.cli import main

    base_dir = tmp_path / "base_model"
    base.save_pretrained(str(base_dir))
    bpath = save_state_dict(base, tmp_path / "base.safetensors")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.HiraConfig(r=2, target_modules=["c_attn"], task_type=task_type))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "hira_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.2)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "hira"))
    with torch.no_grad():
        want = pm(**inputs).logits
    lie = str(tmp_path / "lie.safetensors")
    assert main(["convert", "--from-peft", str(tmp_path / "hira"), "--base", bpath, "-o", lie]) == 0
    ours = load_adapter(copy.deepcopy(base), lie).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    back = tmp_path / "back"
    assert main(["convert", "--to-peft", lie, "-o", str(back), "--base-model", str(base_dir)]) == 0
    return back, want


def test_seq_cls_adapter_with_its_head_converts_both_ways(tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(_gpt2_config(num_labels=3)).eval()
    inputs = {"input_ids": torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(2))}
    back, want = _peft_round_trip(tmp_path, base, "SEQ_CLS", inputs)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(back)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_causal_lm_adapter_converts_both_ways(tmp_path):
    from peft import AutoPeftModelForCausalLM

    base = _causal_lm()
    inputs = {"input_ids": torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(3))}
    back, want = _peft_round_trip(tmp_path, base, "CAUSAL_LM", inputs)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(back)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    import json

    cfg = json.load(open(back / "adapter_config.json"))
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(tmp_path / "base_model")


def test_a_saved_head_round_trips_through_save_adapter(tmp_path):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(_gpt2_config(num_labels=3)).eval()
    model = apply_adapters_(model, LieConfig(r=2, targets=["c_attn"], modules_to_save=["score"]))
    path = save_adapter(model, str(tmp_path / "t.safetensors"))
    from liedeploy import read_adapter

    assert set(read_adapter(path).full) == {"score.weight"}
