"""An adapted model trains under transformers.Trainer; checkpoints hold the adapter; resume continues it."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from liedeploy import LieConfig, apply_adapters_, read_adapter  # noqa: E402

pytestmark = pytest.mark.slow


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.classifier = nn.Linear(8, 3)  # a head of the task's own, trained whole

    def forward(self, x, labels=None):
        logits = self.classifier(self.body(x).relu())
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 6, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _trainer(model, out, steps):
    from liedeploy.hf_trainer import LieAdapterCallback

    args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
                                          learning_rate=5e-2, lr_scheduler_type="constant", save_steps=2, save_strategy="steps", logging_steps=100,
                                          report_to=[], use_cpu=True, seed=0, data_seed=0,
                                          dataloader_num_workers=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[LieAdapterCallback()])


def _model():
    torch.manual_seed(0)
    m = Tiny()
    return apply_adapters_(m, LieConfig(r=2, targets=["body"], modules_to_save=["classifier"]))


def test_trainer_saves_adapter_files_and_resume_continues_the_same_adapter(tmp_path):
    full = _trainer(_model(), tmp_path / "full", 4)
    full.train()
    ck = read_adapter(str(tmp_path / "full" / "checkpoint-2" / "lie_adapter.safetensors"))
    assert set(ck.targets) == {"body.weight"} and set(ck.full) == {"classifier.weight", "classifier.bias"}
    end = read_adapter(str(tmp_path / "full" / "lie_adapter.safetensors"))
    assert not torch.equal(end.factors["body.weight"][0], ck.factors["body.weight"][0])  # it trained on
    # stop after 2 steps, then resume from that checkpoint with a fresh model
    first = _trainer(_model(), tmp_path / "part", 2)
    first.train()
    resumed = _trainer(_model(), tmp_path / "part", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    got = read_adapter(str(tmp_path / "part" / "lie_adapter.safetensors"))
    for P in end.factors:
        for a, b in zip(got.factors[P], end.factors[P]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for P in end.full:
        torch.testing.assert_close(got.full[P], end.full[P], rtol=1e-5, atol=1e-6)
