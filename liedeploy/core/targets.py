"""Which tensors a :class:`~liedeploy.config.LieConfig` selects, with PEFT's matching rules.

- A list item names a parameter (``"fc.weight"``, or a dotted suffix of one) or a module
  (``"query"``, ``"encoder.layer.0.attention"``): naming a module adapts all its rank >= 2
  parameters (``nn.MultiheadAttention``'s ``in_proj_weight`` too; biases never), and for a module
  under a torch parametrization (``weight_norm`` of Wav2Vec2, HuBERT, EnCodec, vocoders) the
  parametrization's original of the weight's own shape (``parametrizations.weight.original1``).
  An item with regex characters also matches as a regex over the whole parameter or module name.
  Every item must match something: an item that matches nothing is an error naming it.
- A single string is a regex over the whole parameter name.
- ``"all-linear"`` (PEFT's shorthand): every ``nn.Linear`` and transformers ``Conv1D`` weight except
  the output layer (``model.get_output_embeddings()``) and ``modules_to_save``.
- ``exclude_modules``: module names (or dotted suffixes; a string: a regex) left alone, with
  everything inside them.
- ``modules_to_save``: modules whose parameters train and are saved whole with the adapter (a new
  classifier head...), matched by name or dotted suffix like PEFT's.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

from torch import nn

from liedeploy.errors import ConfigError, LieError

__all__ = ["ALL_LINEAR", "Candidate", "select_targets", "select_modules_to_save", "owner_module_name"]

ALL_LINEAR = "all-linear"
_REGEX_CHARS = re.compile(r"[*+?\[\]()|^$\\]")
_PARAM_LIST = re.compile(r"^(?P<owner>.*?)\.?parametrizations\.(?P<attr>[^.]+)$")


class Candidate:
    """A parameter that could be adapted: ``name`` (state_dict key), its ``module`` and ``attr``,
    the ``owner`` module name it belongs to for module matching, and whether it is weight-like."""

    __slots__ = ("name", "module", "attr", "param", "owner", "weight_like", "owner_module")

    def __init__(self, name, module, attr, param, owner, weight_like, owner_module):
        self.name, self.module, self.attr, self.param = name, module, attr, param
        self.owner, self.weight_like, self.owner_module = owner, weight_like, owner_module

    def as_tuple(self):
        return self.name, self.module, self.attr, self.param


def owner_module_name(module_name: str) -> str:
    """``"conv.parametrizations.weight"`` -> ``"conv"``; other names are their own owner."""
    m = _PARAM_LIST.match(module_name)
    return m.group("owner") if m else module_name


def _is_bias(attr: str) -> bool:
    return attr == "bias" or attr.endswith("_bias") or attr.startswith("bias_")


def _candidates(model: nn.Module) -> Iterator[Candidate]:
    modules = dict(model.named_modules())
    for mod_name, module in modules.items():
        m = _PARAM_LIST.match(mod_name)
        for attr, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{attr}" if mod_name else attr
            if m:  # an original of a torch parametrization: weight-like if it has the parametrized shape
                owner = m.group("owner")
                owner_mod = modules.get(owner)
                try:
                    shape = tuple(getattr(owner_mod, m.group("attr")).shape)
                except Exception:  # noqa: BLE001 - a parametrization that cannot be evaluated here
                    shape = None
                weight_like = param.dim() >= 2 and tuple(param.shape) == shape
                yield Candidate(name, module, attr, param, owner, weight_like, owner_mod)
            else:
                weight_like = param.dim() >= 2 and not _is_bias(attr)
                yield Candidate(name, module, attr, param, mod_name, weight_like, module)


def _suffix(name: str, item: str) -> bool:
    return name == item or name.endswith("." + item)


def _item_hits(item: str, c: Candidate) -> bool:
    if _suffix(c.name, item):
        return True
    if c.weight_like and c.owner and _suffix(c.owner, item):
        return True
    if _REGEX_CHARS.search(item):
        try:
            rx = re.compile(item)
        except re.error:
            return False
        return rx.fullmatch(c.name) is not None or (c.weight_like and rx.fullmatch(c.owner or "") is not None)
    return False


def _excluded(exclude, c: Candidate) -> bool:
    """Whether the owner module, or a module it lies in, is excluded."""
    if not exclude:
        return False
    parts = (c.owner or "").split(".")
    scopes = [".".join(parts[: i + 1]) for i in range(len(parts))] if c.owner else [""]
    if isinstance(exclude, str):
        return any(re.fullmatch(exclude, sc) is not None for sc in scopes)
    return any(_suffix(sc, e) for sc in scopes for e in exclude)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def select_modules_to_save(model: nn.Module, names) -> dict:
    """``{module name: module}`` for ``modules_to_save`` (PEFT: a name or a dotted suffix); each must match."""
    if not names:
        return {}
    out = {}
    modules = dict(model.named_modules())
    for item in names:
        hits = {n: m for n, m in modules.items() if n and _suffix(n, item)}
        if not hits:
            raise ConfigError(f"modules_to_save item {item!r} matches no module of the model")
        out.update(hits)
    return out


def select_targets(model: nn.Module, config, saved: Optional[dict] = None) -> list:
    """``[(name, module, attr, param)]`` selected by ``config`` (see the module docs)."""
    saved = saved or {}
    cands = [c for c in _candidates(model)
             if not any(c.owner == s or (c.owner or "").startswith(s + ".") or not s for s in saved)]
    cands = [c for c in cands if not _excluded(config.exclude_modules, c)]
    targets = config.targets
    chosen = []
    if targets == ALL_LINEAR:
        out_layer = None
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            try:
                out_layer = get_out()
            except Exception:  # noqa: BLE001 - not a transformers model after all
                out_layer = None
        chosen = [c for c in cands if c.attr == "weight" and _is_linear(c.owner_module) and c.owner_module is not out_layer]
        if not chosen:
            raise LieError("targets='all-linear' found no nn.Linear or Conv1D weight (besides the output layer)")
    elif isinstance(targets, str):
        rx = re.compile(targets)
        chosen = [c for c in cands if rx.fullmatch(c.name)]
    elif targets is not None:
        seen = set()
        for item in targets:
            hits = [c for c in cands if _item_hits(item, c)]
            if not hits:
                raise LieError(f"target {item!r} matches no parameter of the model (targets={list(targets)!r})")
            for c in hits:
                if c.name not in seen:
                    seen.add(c.name)
                    chosen.append(c)
        order = {c.name: i for i, c in enumerate(cands)}
        chosen.sort(key=lambda c: order[c.name])
    else:
        chosen = list(cands)
    if config.filter_fn is not None:
        chosen = [c for c in chosen if config.filter_fn(c.module, c.name)]
    return [c.as_tuple() for c in chosen]
