"""A small training loop for Lie adapters on CPU or CUDA.

Device choice, bf16 autocast on CUDA, a progress bar on a terminal (quiet when piped),
adapter-only checkpoints (the factors, never the base).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from liedeploy.core.adapter_file import save_adapter
from liedeploy.errors import ConfigError
from liedeploy.progress import progress_bar

__all__ = ["resolve_device", "train_adapters", "evaluate"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but no CUDA device is visible")
    return dev


def _autocast(device: torch.device, bf16: bool | str):
    if bf16 == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16))


def train_adapters(
    model: nn.Module,
    data: Iterable,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    loss_fn: Callable = F.cross_entropy,
    device: str | torch.device | None = "auto",
    bf16: bool | str = "auto",
    checkpoint: Optional[str] = None,
    name: Optional[str] = None,
    progress: Optional[bool] = None,
    desc: str = "train",
) -> list[float]:
    """Train the trainable parameters of ``model`` (the Lie factors) with AdamW.

    Args:
        model: a model prepared with ``apply_adapters_``.
        data: an iterable of batches (e.g. a DataLoader), re-iterated per epoch: ``(inputs, targets)``
            pairs (``inputs`` a tensor, or a dict of keyword inputs), or dicts of keyword inputs as
            transformers' collators make them (``input_ids``, ``attention_mask``, ``labels``).
        epochs, lr, weight_decay: optimisation settings.
        loss_fn: ``loss_fn(logits, targets)``. A transformers model that returns a ``loss`` (it was
            given ``labels``) is trained on that loss; otherwise the output's ``logits`` (or the
            output itself, for a plain module) go to ``loss_fn``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:0"``...
        bf16: autocast to bfloat16; ``"auto"`` = on for CUDA devices that support it.
        checkpoint: adapter file written (atomically) after every epoch: factors only.
        name: task name stored in the checkpoint.
        progress: show a progress bar; default: only when stderr is a terminal.

    Returns:
        The mean training loss of each epoch.

    Example:
        >>> losses = train_adapters(model, loader, epochs=3, checkpoint="task.safetensors")
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    dev = resolve_device(device)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; call apply_adapters_ first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    history = []
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = progress_bar(data, desc=f"{desc} {epoch + 1}/{epochs}", enabled=progress)
        for batch in bar:
            inputs, targets = _split(batch, dev)
            with _autocast(dev, bf16):
                out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
                loss = _loss(out, targets, loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = _batch_size(inputs)
            total += float(loss.detach()) * n
            count += n
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        history.append(total / max(count, 1))
        if checkpoint:
            save_adapter(model, checkpoint, name=name)
    model.eval()
    return history


def _to(value, dev):
    if isinstance(value, torch.Tensor):
        return value.to(dev, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to(v, dev) for k, v in value.items()}
    return value


def _split(batch, dev):
    """``(inputs, targets or None)`` on ``dev`` from a ``(inputs, targets)`` pair or a keyword dict."""
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        return _to(dict(batch), dev), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return _to(batch[0], dev), _to(batch[1], dev)
    raise ConfigError("train_adapters takes (inputs, targets) batches or dicts of keyword inputs "
                      f"(input_ids, attention_mask, labels...), got a {type(batch).__name__}")


def _loss(out, targets, loss_fn):
    loss = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
    if loss is not None:
        return loss
    logits = out
    if not isinstance(out, torch.Tensor):
        logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
        if logits is None:
            raise ConfigError("the model's output has neither a loss nor logits: pass labels in the batch, or "
                              "return a tensor")
    if targets is None:
        raise ConfigError("the batch has no targets and the model returned no loss: pass (inputs, targets) "
                          "or put labels in the batch")
    return loss_fn(logits, targets)


def _batch_size(inputs) -> int:
    if isinstance(inputs, dict):
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        return len(first) if first is not None else 1
    return len(inputs)


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, device: str | torch.device | None = "auto") -> float:
    """Top-1 accuracy of a classifier over ``(inputs, labels)`` batches."""
    dev = resolve_device(device)
    model.to(dev).eval()
    correct = total = 0
    for x, y in data:
        pred = model(x.to(dev)).argmax(-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)
