"""One contract for every exporter: its arguments, its report, how it is looked up.

Like PEFT's ``register_peft_method``: an exporter is a class with a ``name``, what it accepts
(``takes_adapters``, ``supports_fp16``, ``out_is_folder``), a ``check`` of the request that runs
before any model is built (usage errors) and an ``export`` that writes through
:class:`liedeploy.atomic.Staging` (stage everything, verify, publish; nothing half-written) and
returns an :class:`ExportReport`. The CLI looks exporters up by name instead of branching.

To add one: subclass :class:`Exporter`, set ``name`` and the flags, implement ``export`` (and
``check`` for flags it cannot honour), decorate with :func:`register_exporter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from liedeploy.errors import ConfigError

__all__ = ["ExportRequest", "ExportReport", "Exporter", "register_exporter", "get_exporter", "EXPORTERS"]


@dataclass
class ExportRequest:
    """What every exporter gets. ``model`` and ``example_inputs`` are filled in after ``check``."""

    out: str
    model: Any = None
    example_inputs: tuple = ()
    opset: int = 18
    dynamic_batch: bool = False
    fp16: bool = False
    atol: Optional[float] = None
    rtol: Optional[float] = None
    adapters: Sequence[str] = ()
    options: dict = field(default_factory=dict)


@dataclass
class ExportReport:
    """What every exporter returns: where the files are, whether the check passed, the details,
    and the one-line ``summary`` the CLI prints."""

    exporter: str
    out: str
    ok: bool
    files: list
    details: dict
    summary: str = ""

    def to_dict(self) -> dict:
        return {"exporter": self.exporter, "out": self.out, "ok": self.ok, "files": self.files, **self.details}

    @property
    def max_abs_error(self) -> float:
        """Largest absolute difference to torch over every check in the report (0 if none)."""
        worst = 0.0

        def walk(node):
            nonlocal worst
            if isinstance(node, dict):
                if isinstance(node.get("max_abs"), (int, float)):
                    worst = max(worst, float(node["max_abs"]))
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(self.details)
        return worst


class Exporter(ABC):
    """Base class: implement ``export`` and, where flags do not apply, extend ``check``."""

    name: str = ""
    help: str = ""
    takes_adapters: bool = False  # needs --bank/--task-models ADAPTER files
    supports_fp16: bool = True
    out_is_folder: bool = False
    builds_model: bool = True  # False: the exporter reads its model itself (no --model/--weights)

    def check(self, request: ExportRequest) -> None:
        """Refuse flags this exporter cannot honour (raise ConfigError); runs before any model is built."""
        if request.fp16 and not self.supports_fp16:
            raise ConfigError(f"--fp16 does not apply to the {self.name} export")
        if self.takes_adapters and not request.adapters:
            raise ConfigError(f"the {self.name} export needs adapter files")
        if request.adapters and not self.takes_adapters:
            raise ConfigError(f"the {self.name} export takes no adapter files")

    def prepare(self, request: ExportRequest) -> None:
        """Once ``check`` passed and before the model is built: refuse a missing stack, load what the
        options name (the calibration inputs of ``--quantize int8``), create the output folder."""
        import os

        if request.options.get("quantize") and isinstance(request.options.get("calibration"), str):
            from liedeploy.exporters.quantize import load_calibration

            request.options["calibration"] = load_calibration(request.options["calibration"],
                                                              tuple(request.example_inputs[0].shape))
        folder = request.out if self.out_is_folder else os.path.dirname(os.path.abspath(request.out))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            from liedeploy.errors import OutputPathError

            raise OutputPathError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None

    @abstractmethod
    def export(self, request: ExportRequest) -> ExportReport:
        """Write the export for ``request`` through a Staging folder and return its report."""


EXPORTERS: dict = {}


def register_exporter(cls):
    """Class decorator: make ``cls`` available as ``get_exporter(cls.name)``."""
    if not cls.name or cls.name in EXPORTERS:
        raise ConfigError(f"exporter name {cls.name!r} is empty or taken")
    EXPORTERS[cls.name] = cls
    return cls


def get_exporter(name: str) -> Exporter:
    """The registered exporter ``name`` (the built-in ones are registered on first use)."""
    from liedeploy.exporters import builtin  # noqa: F401  (registers onnx, onnx-bank, onnx-tasks, onnx-refit, trt)

    if name not in EXPORTERS:
        raise ConfigError(f"unknown exporter {name!r}; known: {', '.join(sorted(EXPORTERS))}")
    return EXPORTERS[name]()
