"""One error model: every refusal the library raises is a :class:`LieError` (one sentence).

Like PEFT's ``PeftError``: catch ``LieError`` to catch every refusal of liedeploy, or a subclass
for one kind. ``LieError`` is a ``ValueError`` (a refused input); ``MissingDependencyError`` is
also an ``ImportError`` so existing ``except ImportError`` code keeps working.
"""

from __future__ import annotations

__all__ = [
    "LieError",
    "ConfigError",
    "AdapterFileError",
    "OutputPathError",
    "ExportError",
    "MissingDependencyError",
    "ServingError",
    "require",
]


class LieError(ValueError):
    """A refused input or an impossible request; the message is one sentence."""


class ConfigError(LieError):
    """A configuration that cannot be used (``LieConfig`` validation, bad arguments)."""


class AdapterFileError(LieError):
    """An adapter, base or index file that cannot be used; the message names the file."""


class OutputPathError(LieError):
    """An output path that must not be written (an input, a special file, a folder, outside OUT)."""


class ExportError(LieError):
    """An export that cannot be made or that disagrees with torch; nothing was written."""


class ServingError(LieError):
    """A serving request or setup that is refused (unknown task, unavailable backend...)."""


class MissingDependencyError(LieError, ImportError):
    """An optional stack (onnx, onnxruntime, tensorrt, the serving stack...) is not installed."""


def require(module: str, extra: str, what: str = ""):
    """Import ``module`` or raise :class:`MissingDependencyError` saying which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        need = f"{what} needs {module}" if what else f"{module} is not installed"
        raise MissingDependencyError(f"{need}: pip install 'liedeploy[{extra}]'") from None
