import pytest
import json
import os

from liedeploy.cli import main
from liedeploy.core.adapter_file import read_adapter


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--tasks", "rotated", "parity", "--pretrain-epochs", "8",
                 "--adapter-epochs", "15", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["base_accuracy_upright"] > 0.8
    assert [t["task"] for t in summary["tasks"]] == ["rotated", "parity"]
    for t in summary["tasks"]:
        assert os.path.exists(t["adapter_file"])
        af = read_adapter(t["adapter_file"])
        assert af.name == t["task"] and af.expmap == "exact"
        # the adapter fixes what the distribution shift broke; the new task learns from scratch
        assert t["adapted_accuracy"] > t["base_accuracy"] + (0.3 if t["task"] == "rotated" else 0.25)
        assert abs(t["merged_accuracy"] - t["adapted_accuracy"]) <= 1 / 400
        assert t["bank_accuracy"] == t["merged_accuracy"]
        assert t["onnx_accuracy"] == t["merged_accuracy"]
    rotated, parity = summary["tasks"]
    assert abs(rotated["onnx_bank_accuracy"] - rotated["merged_accuracy"]) <= 1 / 400
    # the new task has a 2-class head of its own, saved whole (format 2), refused by the bank graph
    assert parity["classes"] == 2 and parity["new_head"] and parity["onnx_bank_accuracy"] is None
    af = read_adapter(parity["adapter_file"])
    assert af.format_version == "2" and af.full["head.weight"].shape == (2, 64)
    # the serving step: every task answered over HTTP, equal to the in-process bank
    assert summary["serve"]["ok"]
    assert [r["task"] for r in summary["serve"]["tasks"]] == ["rotated", "parity"]
    assert all(r["max_abs_vs_in_process"] <= 1e-5 for r in summary["serve"]["tasks"])
