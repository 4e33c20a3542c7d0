"""One declared owner for everything liedeploy knows about a model's adapters.

A model with Lie adapters holds one :class:`LieState` as its attribute ``lie_state``, reached
through :func:`lie_state` (``None`` for a model without adapters); nothing else sets attributes on
a user's model. It declares, and is the only place of:

- ``config``: the :class:`~liedeploy.core.config.LieConfig` the adapters were made with;
- ``merged``: per merged weight, a :class:`MergedWeight` (its module, the parametrization that
  holds the live factors, and where the pristine copy is kept); a weight not in ``merged`` is live;
- ``modules_to_save`` and ``full_originals``: the modules a task replaces whole and the base
  tensors they replaced (format "2");
- ``adapters`` / ``active_adapter``: named adapters (PEFT's ``adapter_name``) and the active one;
- ``enabled``: False inside ``disable_adapters`` (every parametrization reads one switch).

The tensors it keeps (the pristine copy of a merged weight, the merged buffer ``unmerge_`` keeps
for the next ``merge_``, a base tensor that a full tensor replaced) live in the module tree, as
``torch.nn.utils.parametrize`` keeps ``parametrizations[name].original``: as non-persistent
buffers of the owning module named ``<attr>_lie_kept``, ``<attr>_lie_spare`` and
``<attr>_lie_base``. So ``.to()``, ``.half()``, ``.double()`` and ``.cuda()`` move and convert
them with the model, ``copy.deepcopy`` copies them, and ``state_dict()`` keys do not change. The state
object itself is not a module, so containers (``nn.Sequential``) never see it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = [
    "LieState",
    "MergedWeight",
    "AdapterSwitch",
    "STATE_NAME",
    "KEPT",
    "SPARE",
    "BASE",
    "hold",
    "held",
    "lie_state",
    "ensure_state",
    "drop_state",
]

STATE_NAME = "lie_state"
KEPT, SPARE, BASE = "_lie_kept", "_lie_spare", "_lie_base"  # buffer name suffixes


class AdapterSwitch:
    """The one ``enabled`` flag every parametrization of a model reads."""

    __slots__ = ("enabled",)

    def __init__(self) -> None:
        self.enabled = True


def hold(module: nn.Module, name: str, tensor: Optional[torch.Tensor]) -> None:
    """Keep ``tensor`` as the non-persistent buffer ``name`` of ``module`` (``None`` drops it).

    A Parameter is kept as a plain tensor over the same storage (buffers are not parameters: an
    exporter would otherwise take it for one); whoever puts it back wraps it again, without a copy.
    """
    module._buffers.pop(name, None)
    module._non_persistent_buffers_set.discard(name)
    if tensor is not None:
        module.register_buffer(name, tensor.detach(), persistent=False)


def held(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The buffer ``name`` that :func:`hold` kept on ``module`` (``None`` if none)."""
    return module._buffers.get(name)


class MergedWeight:
    """What ``merge_`` keeps for one parameter so that ``unmerge_`` restores it bit for bit."""

    __slots__ = ("module", "attr", "lie")

    def __init__(self, module: nn.Module, attr: str, lie: nn.Module):
        self.module, self.attr, self.lie = module, attr, lie

    @property
    def kept(self) -> Optional[torch.Tensor]:
        """The pristine base tensor (``None`` after ``merge_(keep_base=False)``)."""
        return held(self.module, self.attr + KEPT)

    # the adapter's view, used by save_adapter on a merged model
    B = property(lambda self: self.lie.lie_B)
    A = property(lambda self: self.lie.lie_A)
    scale = property(lambda self: self.lie.scale)
    expmap = property(lambda self: self.lie.expmap)


class LieState:
    """The adapter state of one model (see the module docstring for what it declares)."""

    def __init__(self, config=None):
        self.config = config
        self.modules_to_save: list = []
        self.merged: dict = {}  # {P: MergedWeight}
        # {P: the merged Parameter whose storage the <attr>_lie_spare buffer holds}: the next merge_
        # hands back the same Parameter object (compiled graphs keep their guards)
        self.spare_params: dict = {}
        self.full_originals: dict = {}  # {P: (owner module, attr, whether the base has P)}
        self.adapters: dict = {}  # {adapter_name: AdapterFile}
        self.active_adapter: Optional[str] = None
        self.switch = AdapterSwitch()

    @property
    def enabled(self) -> bool:
        return self.switch.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.switch.enabled = bool(value)

    @property
    def is_merged(self) -> bool:
        return bool(self.merged)

    def __repr__(self) -> str:
        return (f"LieState(merged={len(self.merged)}, modules_to_save={self.modules_to_save}, "
                f"adapters={list(self.adapters)}, active={self.active_adapter!r}, enabled={self.enabled})")


def lie_state(model: nn.Module) -> Optional[LieState]:
    """The model's :class:`LieState`, or ``None`` when it has no Lie adapters."""
    state = model.__dict__.get(STATE_NAME)
    return state if isinstance(state, LieState) else None


def ensure_state(model: nn.Module, config=None) -> LieState:
    """The model's state, created (with ``config``) when it has none."""
    state = lie_state(model)
    if state is None:
        if hasattr(model, STATE_NAME):
            from liedeploy.errors import LieError

            raise LieError(f"the model already has an attribute {STATE_NAME!r} that is not liedeploy's state")
        state = LieState(config)
        object.__setattr__(model, STATE_NAME, state)
    elif config is not None:
        state.config = config
    return state


def drop_state(model: nn.Module) -> None:
    """Forget every adapter fact of ``model`` (after the adapters themselves are gone)."""
    if lie_state(model) is not None:
        del model.__dict__[STATE_NAME]
