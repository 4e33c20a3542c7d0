"""Per-task replicas of a module tree: new module objects, the very same tensors.

A replica shares every tensor of the base and holds only the tensors given to it (a task's folded
weights, its full tensors). Modules are cloned without ``copy.copy``: a module under a torch
parametrization (``weight_norm``, ``spectral_norm``, ``orthogonal`` on Wav2Vec2, HuBERT, WavLM,
EnCodec, vocoders) refuses to be copied or pickled, so the clone is built from the instance
``__dict__`` directly, parametrizations included (their ``original`` tensors are ordinary
parameters of a ``ParametrizationList`` and can be replaced like any other).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from liedeploy.core.tensors import owner_of, set_tensor

__all__ = ["clone_tree", "build_replica", "refill_replica", "replica_key"]


def clone_tree(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A new module tree whose modules are shallow copies: every tensor is shared, not copied.

    Shared submodules stay shared (``memo``); the class of each module is kept, so dynamically
    created parametrized classes keep their ``weight`` properties.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = object.__new__(type(module))  # no __reduce__/__getstate__: works for parametrized modules
    clone.__dict__.update(module.__dict__)
    memo[id(module)] = clone
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {k: (None if m is None else clone_tree(m, memo)) for k, m in module._modules.items()}
    return clone


def build_replica(base: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A replica of ``base`` in which each ``{state_dict name: tensor}`` replaces (or adds) that tensor.

    Raises:
        LieError: a name whose owning module does not exist in ``base``.
    """
    return refill_replica(clone_tree(base), tensors)


def refill_replica(replica: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Put ``tensors`` into ``replica`` in place (a replica built for the same names is reused this
    way by a bank, instead of cloning the module tree again)."""
    for name, t in tensors.items():
        owner, attr = owner_of(replica, name, where="the base model")
        set_tensor(owner, attr, t)
    return replica


def replica_key(tensors: Mapping[str, torch.Tensor]) -> frozenset:
    """Which recycled replica fits a fold: one built for the same names, each packed or dense as before."""
    return frozenset((n, t.layout) for n, t in tensors.items())
