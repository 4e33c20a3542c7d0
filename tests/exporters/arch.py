"""Small real architectures (transformers configs, random weights) and toy models, as factories."""

import torch
from torch import nn


class _Logits(nn.Module):
    def __init__(self, inner, attr):
        super().__init__()
        self.inner = inner
        self.attr = attr

    def forward(self, x):
        return getattr(self.inner(x), self.attr)


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=5)
    return _Logits(ResNetForImageClassification(cfg), "logits")


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5)
    return _Logits(ConvNextForImageClassification(cfg), "logits")


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=5)
    return _Logits(ViTForImageClassification(cfg), "logits")


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=64, use_cache=False)
    return _Logits(GPT2LMHeadModel(cfg), "logits")


def conv1d():
    return nn.Sequential(nn.Conv1d(3, 8, 5, dilation=2, padding=4, padding_mode="circular"), nn.ReLU(), nn.Conv1d(8, 4, 1, groups=4))


def conv3d():
    return nn.Sequential(nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), groups=2), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1, padding_mode="replicate"))


def convtranspose2d():
    return nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1, groups=3), nn.Tanh(), nn.Conv2d(6, 2, 3))


# name: (factory, targets, example input)
ARCHS = {
    "resnet": (resnet, r".*convolution\.weight|.*classifier\.1\.weight", lambda: torch.randn(2, 3, 32, 32)),
    "convnext": (convnext, r".*(dwconv|pwconv1|pwconv2)\.weight", lambda: torch.randn(2, 3, 32, 32)),
    "vit": (vit, r".*(q_proj|k_proj|v_proj|o_proj|query|key|value|dense|fc1|fc2)\.weight", lambda: torch.randn(2, 3, 32, 32)),
    "gpt2": (gpt2, r".*(c_attn|c_proj|c_fc)\.weight", lambda: torch.randint(0, 64, (2, 12))),
    "conv1d": (conv1d, r".*weight", lambda: torch.randn(2, 3, 20)),
    "conv3d": (conv3d, r".*weight", lambda: torch.randn(1, 2, 4, 8, 8)),
    "convtranspose2d": (convtranspose2d, r"\d\.weight", lambda: torch.randn(2, 3, 8, 8)),
}


def llama(use_cache=True):
    """A tiny LlamaForCausalLM; its default ``use_cache=True`` returns a cache object."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, use_cache=use_cache)
    return LlamaForCausalLM(cfg)


_BUILT = []


def marker(path):
    """A factory that records that it ran (tests of usage errors check it never did)."""
    open(path, "w").write("built")
    return nn.Linear(4, 2)


def conv3d_files(folder):
    """``(base weights, adapter)`` files of the conv3d case in ``folder`` (for CLI export tests)."""
    from tests.conftest import _write_adapter, save_state_dict

    torch.manual_seed(0)
    base = conv3d()
    return save_state_dict(base, folder / "w.safetensors"), _write_adapter(base, folder / "a.safetensors", ["0"])
