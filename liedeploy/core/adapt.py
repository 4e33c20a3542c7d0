"""Attach Lie adapters to a model: find targets, add factors, freeze the base.

The adapted weight replaces the stored weight inside the module's own forward through
``torch.nn.utils.parametrize``: no layer's forward is re-implemented, so every option of the
wrapped layer (groups, dilation, padding_mode, output_padding, Conv1D's transposed layout, ...)
keeps working.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from liedeploy.core.algebra import lie_fold
from liedeploy.core.config import LieConfig
from liedeploy.core.state import SPARE, AdapterSwitch, drop_state, ensure_state, hold, lie_state
from liedeploy.errors import ConfigError, LieError

__all__ = [
    "LieParametrization",
    "apply_adapters_",
    "iter_adapters",
    "adapted_names",
    "remove_adapters_",
    "trainable_parameter_count",
    "own_class",
    "register",
    "unregister",
]


class LieParametrization(nn.Module):
    """Maps the pristine weight W to W * exp(scale * reshape(lie_B @ lie_A)) (or first order).

    ``lie_B``: (shape[0], r), zeros at init; ``lie_A``: (r, prod(shape[1:])), kaiming-uniform.
    """

    def __init__(self, shape, r: int, scale: float, expmap: str, dtype=None, device=None, switch=None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape[1:])
        self.shape = shape
        self.r = int(r)
        self.scale = float(scale)
        self.expmap = expmap
        self.lie_A = nn.Parameter(torch.empty(self.r, n, dtype=dtype, device=device))
        self.lie_B = nn.Parameter(torch.zeros(shape[0], self.r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lie_A, a=math.sqrt(5))
        # the model's one on/off switch (LieState.switch): off inside disable_adapters()
        self.switch = switch if switch is not None else AdapterSwitch()

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if not self.switch.enabled:
            return W
        return lie_fold(W, self.lie_B, self.lie_A, self.scale, self.expmap)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, r={self.r}, scale={self.scale:g}, expmap={self.expmap!r}"


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision bases train float32 factors (as PEFT's autocast_adapter_dtype).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, LieParametrization]]:
    """Yield ``(param_name, module, attr, parametrization)`` for every live Lie adapter.

    ``param_name`` is the name the parameter has in the base model's ``state_dict()``.
    """
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, LieParametrization):
                    yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr, p


def adapted_names(model: nn.Module) -> list[str]:
    """Names (base ``state_dict`` keys) of the adapted parameters."""
    return [name for name, *_ in iter_adapters(model)]


def own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    torch creates one ``Parametrized<Cls>`` class per parametrized module, and ``copy.deepcopy``
    shares that class between the original and the copy: removing or adding a parametrization on
    one would then change the other's class (the copy's ``weight`` vanished). Every liedeploy call
    that changes parametrizations first gives the module its own class, so copies stay independent.
    """
    if parametrize.is_parametrized(module):
        cls = type(module)
        ns = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, ns)


def register(module: nn.Module, attr: str, lie: "LieParametrization") -> None:
    own_class(module)
    parametrize.register_parametrization(module, attr, lie, unsafe=True)


def unregister(module: nn.Module, attr: str) -> None:
    own_class(module)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)


def _refuse_tied(model: nn.Module, chosen: list) -> None:
    """Refuse adapting a parameter that another name of the model shares (GPT-2's wte / lm_head)."""
    names: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for name, _, _, param in chosen:
        others = [n for n in names.get(id(param), []) if n != name]
        if others:
            raise LieError(
                f"parameter {name} is tied to {others[0]} (one tensor, two names): an adapter on it would change "
                "both layers in memory but only one in a saved or merged file; untie them first "
                "(e.g. config.tie_word_embeddings=False) or leave both out of the targets"
            )


def apply_adapters_(model: nn.Module, config: LieConfig, *, targets_exact: Optional[dict] = None) -> nn.Module:
    """Add Lie adapters to ``model`` in place and return it.

    Every parameter selected by ``config`` (rank >= 2) gets factors ``lie_B``/``lie_A``; all other
    parameters are frozen, so only the factors train. At init ``lie_B = 0``: the model computes
    exactly what it computed before.

    Args:
        model: any ``nn.Module``.
        config: a :class:`LieConfig`.
        targets_exact: internal (used by ``load_adapter``): ``{name: (r, scale)}`` overriding the
            selection with exact names, ranks and scales.

    Returns:
        ``model``.

    Raises:
        LieError: nothing matched, a selected parameter has rank < 2, or the model already has
            Lie adapters.

    Example:
        >>> model = apply_adapters_(model, LieConfig(r=4, targets=["conv1", "fc"]))
    """
    if not isinstance(config, LieConfig):
        raise ConfigError(f"apply_adapters_ expects a LieConfig, got {type(config).__name__}")
    state = lie_state(model)
    existing = adapted_names(model) or (sorted(state.merged) if state is not None else [])
    if existing:
        raise LieError(
            f"the model already has Lie adapters (on {existing[0]}"
            f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}); "
            "call merge_ or remove_adapters_ first"
        )
    from liedeploy.core.targets import select_modules_to_save, select_targets

    saved = select_modules_to_save(model, config.modules_to_save) if targets_exact is None else {}
    if targets_exact is not None:
        wanted = set(targets_exact)
        chosen = [c for c in select_targets(model, LieConfig(targets=None, filter_fn=lambda m, n: n in wanted))]
        missing = wanted - {c[0] for c in chosen}
        if missing:
            raise LieError(f"target {sorted(missing)[0]} is not a parameter of this model")
    else:
        chosen = select_targets(model, config, saved)
        if not chosen and not saved:
            raise LieError(f"no parameter of the model matches {config.describe_targets()}")
    _refuse_tied(model, chosen)
    for name, _, _, param in chosen:
        if param.dim() < 2:
            raise LieError(
                f"parameter {name} has shape {tuple(param.shape)}: Lie adapters need a tensor of rank >= 2 "
                "(narrow the targets, e.g. to '...weight')"
            )
    state = ensure_state(model, config)
    state.modules_to_save = sorted(saved)
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in saved.values():  # modules_to_save: trained and saved whole (a new head...)
        for p in mod.parameters():
            p.requires_grad_(True)
    for name, module, attr, param in chosen:
        if targets_exact is not None:
            r, scale = targets_exact[name]
        else:
            r, scale = config.rank_for(name), config.scale_for(name)
        lie = LieParametrization(
            param.shape, r, scale, config.expmap, dtype=_factor_dtype(param.dtype), device=param.device,
            switch=state.switch,
        )
        register(module, attr, lie)
    return model


def remove_adapters_(model: nn.Module) -> nn.Module:
    """Drop every Lie adapter, named or not, and give back the pristine base parameters (no fold).

    A merged model is unmerged first (from the copy ``merge_`` kept); one merged with
    ``keep_base=False`` kept nothing and is refused: ``unmerge_(model, base=...)`` first.
    Afterwards the model holds no adapter state at all (``list_adapters`` is empty).
    """
    from liedeploy.core.full_tensors import restore_full_tensors

    state = lie_state(model)
    if state is not None and state.merged:
        if any(rec.kept is None for rec in state.merged.values()):
            raise LieError("the model was merged with keep_base=False and kept no pristine copy: "
                           "call unmerge_(model, base=BASE.safetensors) before remove_adapters_")
        from liedeploy.core.merge import unmerge_

        unmerge_(model, release=True)
    for _, module, attr, _ in list(iter_adapters(model)):
        hold(module, attr + SPARE, None)  # a merged buffer unmerge_ kept for the next merge_
        unregister(module, attr)
    restore_full_tensors(model)
    drop_state(model)
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars (the Lie factors after ``apply_adapters_``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
