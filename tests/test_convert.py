"""`liedeploy convert`: PEFT HiRA <-> Lie first_order, checked against PEFT's own forward."""

import copy
import zlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from liedeploy import LieConfig, LieError, apply_adapters_, load_adapter, save_adapter  # noqa: E402
from liedeploy.core.adapt import iter_adapters  # noqa: E402
from liedeploy.cli import main  # noqa: E402
from tests.conftest import save_state_dict


class M(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 5)
        self.c1d = Conv1D(7, 5)  # weight (5, 7): in 5, out 7
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, ids, img):
        h = self.c1d(self.lin(self.emb(ids)))
        return h.sum(-1), self.conv(img)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 10, (2, 4), generator=g), torch.randn(2, 3, 5, 5, generator=g)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_from_peft_matches_peft_forward(tmp_path):
    from peft import HiraConfig, get_peft_model

    torch.manual_seed(0)
    base = M().eval()
    bpath = str(tmp_path / "base.safetensors")
    save_state_dict(base, bpath)
    pm = get_peft_model(copy.deepcopy(base), HiraConfig(r=2, target_modules=["emb", "lin", "c1d", "conv"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "hira_" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()) % 1000)) * 0.3)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "hira"))
    out = str(tmp_path / "lie.safetensors")
    assert main(["convert", "--from-peft", str(tmp_path / "hira"), "--base", bpath, "-o", out]) == 0
    ours = load_adapter(copy.deepcopy(base), out).eval()
    ids, img = _inputs()
    with torch.no_grad():
        want = pm(ids, img)
        got = ours(ids, img)
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-5
    meta = json.loads(open(out, "rb").read()[8:8 + int.from_bytes(open(out, "rb").read(8), "little")])["__metadata__"]
    assert meta["expmap"] == "first_order" and json.loads(meta["layer_types"])["c1d.weight"] == "Conv1D"


def test_to_peft_loads_in_peft_and_matches(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = M().eval()
    m = apply_adapters_(copy.deepcopy(base), LieConfig(r=3, alpha=6, expmap="first_order",
                                                         targets=["emb", "lin", "c1d", "conv"]))
    with torch.no_grad():
        for _, _, _, lie in iter_adapters(m):
            lie.lie_B.normal_(0, 0.3)
    m.eval()
    path = str(tmp_path / "fo.safetensors")
    save_adapter(m, path)
    assert main(["convert", "--to-peft", path, "-o", str(tmp_path / "peft")]) == 0
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    ids, img = _inputs()
    with torch.no_grad():
        want = m(ids, img)
        got = pm(ids, img)
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-5


def test_exact_map_is_refused_for_peft(tmp_path, capsys):
    m = apply_adapters_(M(), LieConfig(r=2, targets=["lin"]))
    path = str(tmp_path / "exact.safetensors")
    save_adapter(m, path)
    assert main(["convert", "--to-peft", path, "-o", str(tmp_path / "peft")]) == 1
    err = capsys.readouterr().err
    assert "uses the exact map W * exp(dW), which PEFT has no layer for" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "peft" / "adapter_config.json")


def test_convert_usage_and_refusals(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from-peft", str(tmp_path), "-o", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "--from-peft needs --base" in capsys.readouterr().err
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    assert main(["convert", "--from-peft", str(tmp_path / "lora"), "--base", str(tmp_path / "b.safetensors"),
                 "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "only HiRA adapters" in capsys.readouterr().err
    with pytest.raises(LieError):
        from liedeploy.files.peft_convert import to_peft

        to_peft(str(tmp_path / "b.safetensors"), str(tmp_path / "o"))
