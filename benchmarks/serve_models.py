"""Model factories for the serving benchmarks (imported by the server processes)."""

from __future__ import annotations


def resnet18(num_labels: int = 10):
    """A ResNet-18-like transformers config (basic blocks), random weights, logits out."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from tests.exporters.arch import _Logits

    cfg = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                       layer_type="basic", num_labels=int(num_labels))
    return _Logits(ResNetForImageClassification(cfg), "logits").eval()
