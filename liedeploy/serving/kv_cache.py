"""KV-cache rows of transformers' ``DynamicCache`` for continuous batching: how many bytes a token
takes, whether a cache's rows can be joined and dropped, left padding, growth in place without a
copy of the whole cache per step, and the model facts the engine needs (device, cache keyword)."""

from __future__ import annotations

__all__ = ["kv_bytes_per_token", "grow_in_place", "growing_update", "cache_bytes", "joinable", "left_pad",
           "model_device", "cache_kwarg", "cache_of"]


def growing_update(layer, key_states, value_states, *args, **kwargs):
    """``DynamicLayer.update`` without a copy of the whole cache per step: keys and values live in
    buffers with room to grow, and the layer's ``keys``/``values`` are views of their filled part.
    A layer whose tensors were replaced (rows joined or dropped) gets new buffers (one copy)."""
    keys, values = layer.keys, layer.values
    n, t = key_states.shape[-2], keys.shape[-2]
    buf = getattr(layer, "_lie_buf", None)
    if (buf is None or keys.data_ptr() != buf[0].data_ptr() or keys.shape[:2] != buf[0].shape[:2]
            or t + n > buf[0].shape[-2] or keys.shape[-1] != buf[0].shape[-1]):
        cap = t + n + 64
        kb = keys.new_empty(keys.shape[:2] + (cap, keys.shape[-1]))
        vb = values.new_empty(values.shape[:2] + (cap, values.shape[-1]))
        kb[:, :, :t].copy_(keys)
        vb[:, :, :t].copy_(values)
        layer._lie_buf = buf = (kb, vb)
    buf[0][:, :, t:t + n].copy_(key_states)
    buf[1][:, :, t:t + n].copy_(value_states)
    layer.keys, layer.values = buf[0][:, :, :t + n], buf[1][:, :, :t + n]
    return layer.keys, layer.values


def grow_in_place(cache) -> None:
    """Give every dynamic layer of ``cache`` the buffered update (idempotent)."""
    import types

    for layer in cache.layers:
        if getattr(layer, "_lie_growing", False) is False:
            layer.update = types.MethodType(growing_update, layer)
            layer._lie_growing = True


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token of one sequence takes in ``model``, measured by a 1-token forward."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model_device(model)), use_cache=True)
    return max(1, cache_bytes(cache_of(out)))


def model_device(model):
    """The device of ``model``'s parameters (a MixedView: of its replica of the base)."""
    import torch

    target = getattr(model, "model", model)  # a MixedView runs its replica of the base
    p = next(target.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def cache_kwarg(model) -> str:
    """transformers >= 5.25 names the KV cache ``cache``; older releases ``past_key_values``."""
    import inspect

    kind = type(model)
    name = _CACHE_KWARG.get(kind)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = _CACHE_KWARG[kind] = "cache" if "cache" in params else "past_key_values"
    return name


_CACHE_KWARG: dict = {}


def cache_bytes(cache) -> int:
    """Bytes ``cache`` holds: its keys and values, or the buffers they are views of (growth room included)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        buf = getattr(layer, "_lie_buf", None)
        own = buf if buf is not None and layer.keys is not None and layer.keys.data_ptr() == buf[0].data_ptr() else None
        for t in own or (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def joinable(cache) -> bool:
    """Caches whose rows can be padded, concatenated and dropped: full-attention dynamic layers."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(la) is DynamicLayer and la.keys is not None and la.keys.dim() == 4
                                for la in layers)


def left_pad(t, width: int, dim: int):
    import torch.nn.functional as F

    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [extra, 0]
    return F.pad(t, pad)




def cache_of(out):
    """The KV cache of a model output (transformers >= 5.25 names it ``cache``, before ``past_key_values``)."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")
