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

from .algebra import lie_fold
from .config import LieConfig
from .errors import ConfigError, LieError

__all__ = [
    "LieParametrization",
    "apply_adapters_",
    "iter_adapters",
    "adapted_names",
    "remove_adapters_",
    "trainable_parameter_count",
]


class LieParametrization(nn.Module):
    """Maps the pristine weight W to W * exp(scale * reshape(lie_B @ lie_A)) (or first order).

    ``lie_B``: (shape[0], r), zeros at init; ``lie_A``: (r, prod(shape[1:])), kaiming-uniform.
    """

    def __init__(self, shape, r: int, scale: float, expmap: str, dtype=None, device=None):
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

    def forward(self, W: torch.Tensor) -> torch.Tensor:
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


def _select(model: nn.Module, config: LieConfig) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    chosen = []
    for mod_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{attr}" if mod_name else attr
            if config.matches(module, name):
                chosen.append((name, module, attr, param))
    return chosen


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
    existing = adapted_names(model)
    if existing:
        raise LieError(
            f"the model already has Lie adapters (on {existing[0]}"
            f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}); "
            "call merge_ or remove_adapters_ first"
        )
    if targets_exact is not None:
        wanted = set(targets_exact)
        chosen = [c for c in _select(model, LieConfig(targets=None, filter_fn=lambda m, n: n in wanted))]
        missing = wanted - {c[0] for c in chosen}
        if missing:
            raise LieError(f"target {sorted(missing)[0]} is not a parameter of this model")
    else:
        chosen = _select(model, config)
        if not chosen:
            raise LieError(f"no parameter of the model matches {config.describe_targets()}")
    for name, _, _, param in chosen:
        if param.dim() < 2:
            raise LieError(
                f"parameter {name} has shape {tuple(param.shape)}: Lie adapters need a tensor of rank >= 2 "
                "(narrow the targets, e.g. to '...weight')"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, attr, param in chosen:
        if targets_exact is not None:
            r, scale = targets_exact[name]
        else:
            r, scale = config.rank_for(name), config.scale_for(name)
        lie = LieParametrization(
            param.shape, r, scale, config.expmap, dtype=_factor_dtype(param.dtype), device=param.device
        )
        parametrize.register_parametrization(module, attr, lie, unsafe=True)
    model.lie_config = config
    return model


def remove_adapters_(model: nn.Module) -> nn.Module:
    """Drop every Lie adapter and give back the pristine base parameters (no fold)."""
    for _, module, attr, _ in list(iter_adapters(model)):
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    if hasattr(model, "lie_config"):
        del model.lie_config
    if hasattr(model, "_lie_spare"):
        del model._lie_spare  # merged buffers kept by unmerge_
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars (the Lie factors after ``apply_adapters_``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
