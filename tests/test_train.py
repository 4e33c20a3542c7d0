import pytest
import torch
from torch import nn

from liedeploy import LieConfig, apply_adapters_, read_adapter
from liedeploy.errors import ConfigError
from liedeploy.train import evaluate, resolve_device, train_adapters


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def test_train_writes_adapter_only_checkpoints_and_learns(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapters_(model, LieConfig(r=2, alpha=4, targets=["0", "2"]))
    ck = str(tmp_path / "ck.safetensors")
    losses = train_adapters(model, _data(), epochs=15, lr=5e-2, device="cpu", checkpoint=ck, name="task", progress=False)
    assert len(losses) == 15 and losses[-1] < losses[0]
    af = read_adapter(ck)
    assert af.name == "task" and set(af.targets) == {"0.weight", "2.weight"}  # factors only, never the base
    assert torch.equal(model[0].parametrizations.weight.original, base["0.weight"])
    assert evaluate(model, _data(seed=1), "cpu") > 0.6


def test_train_refuses_bad_settings():
    model = nn.Sequential(nn.Linear(6, 2))
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        train_adapters(model, _data(), epochs=0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no trainable parameters; call apply_adapters_ first"):
        train_adapters(model, _data(), epochs=1, device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(ConfigError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu9'"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda' was asked for but no CUDA device is visible"):
            resolve_device("cuda")
