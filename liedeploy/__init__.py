"""liedeploy: Lie-group adapters (W' = W * exp(dW)) from training to deployment.

Example:
    >>> from liedeploy import LieConfig, apply_adapters_, save_adapter, load_adapter, merge_
    >>> model = apply_adapters_(model, LieConfig(r=8, alpha=16, targets=["query", "value"]))
    >>> ...  # train: only the factors require grad
    >>> save_adapter(model, "task.safetensors", name="task")

Names are imported on first use (PEP 562), so ``import liedeploy`` and the CLI's ``--version``,
``--help`` and ``inspect`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib

from liedeploy._version import __version__
from liedeploy.errors import (
    AdapterFileError,
    ConfigError,
    ExportError,
    LieError,
    MissingDependencyError,
    OutputPathError,
    ServingError,
)

_LAZY = {
    "LieConfig": ".core.config",
    "apply_adapters_": ".core.adapt",
    "remove_adapters_": ".core.adapt",
    "trainable_parameter_count": ".core.adapt",
    "save_adapter": ".core.adapter_file",
    "load_adapter": ".core.adapter_file",
    "read_adapter": ".core.adapter_file",
    "merge_": ".core.merge",
    "unmerge_": ".core.merge",
    "merge_files": ".files.file_merge",
    "AdapterBank": ".bank",
    "set_adapter": ".core.named",
    "disable_adapters": ".core.named",
}

__all__ = [
    "__version__",
    *_LAZY,
    "LieError",
    "ConfigError",
    "AdapterFileError",
    "OutputPathError",
    "ExportError",
    "MissingDependencyError",
    "ServingError",
]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'liedeploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
