"""liedeploy: Lie-group adapters (W' = W * exp(dW)) from training to deployment.

Example:
    >>> from liedeploy import LieConfig, apply_adapters_, save_adapter, load_adapter, merge_
    >>> model = apply_adapters_(model, LieConfig(r=8, alpha=16, targets=["query", "value"]))
    >>> ...  # train: only the factors require grad
    >>> save_adapter(model, "task.safetensors", name="task")
"""

from ._version import __version__
from .adapt import apply_adapters_, remove_adapters_, trainable_parameter_count
from .adapter_file import load_adapter, read_adapter, save_adapter
from .bank import AdapterBank
from .config import LieConfig
from .errors import AdapterFileError, LieError
from .merge import merge_, unmerge_
from .merge import merge_files

__all__ = [
    "__version__",
    "LieConfig",
    "apply_adapters_",
    "remove_adapters_",
    "trainable_parameter_count",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "merge_",
    "unmerge_",
    "merge_files",
    "AdapterBank",
    "LieError",
    "AdapterFileError",
]
