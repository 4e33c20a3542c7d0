"""`LieConfig`: what to adapt, at which rank, with which exponential map."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from liedeploy.errors import ConfigError

__all__ = ["LieConfig", "EXPMAPS", "CONFIG_VERSION"]

EXPMAPS = ("exact", "first_order")
CONFIG_VERSION = 1

FilterFn = Callable[[Any, str], bool]


def _check_pattern_dict(field_name: str, value: Any, kind: type) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"LieConfig.{field_name} must be a dict of pattern -> {kind.__name__}, got {value!r}")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"LieConfig.{field_name} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ConfigError(f"LieConfig.{field_name} key {key!r} is not a valid regex: {exc}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"LieConfig.{field_name}[{key!r}] must be a number, got {v!r}")
        if kind is int and (int(v) != v or v < 1):
            raise ConfigError(f"LieConfig.{field_name}[{key!r}] must be a positive integer rank, got {v!r}")
        if kind is float and not (v == v and abs(v) != float("inf")):
            raise ConfigError(f"LieConfig.{field_name}[{key!r}] must be finite, got {v!r}")
        out[key] = kind(v)
    return out


@dataclass
class LieConfig:
    """Configuration of Lie-group adapters (W' = W * exp(alpha/r * reshape(B @ A))).

    Args:
        r: rank of the perturbation (factors B: (shape[0], r), A: (r, prod(shape[1:]))).
        alpha: scaling numerator; the scale applied to B @ A is alpha / r.
        expmap: ``"exact"`` (W * exp(dW), the default) or ``"first_order"`` (W * (1 + dW), HiRA).
        targets: which parameters to adapt. A list of names: each matches a parameter whose
            fully qualified name (as in ``model.state_dict()``) equals it or ends with ``"." + name``,
            or a module with that name or suffix (its ``weight`` is adapted), like PEFT's
            ``target_modules``; an item with regex characters also matches as a regex over the
            whole parameter (or module) name. A single string is a regex that must match the whole
            parameter name (``r"encoder\\..*\\.(query|value)\\.weight"``).
        filter_fn: optional ``(module, parameter_name) -> bool``; with ``targets`` both must hold,
            alone it picks the parameters itself.
        rank_pattern / alpha_pattern: per-target overrides ``{pattern: value}``; a pattern matches a
            parameter or module name by suffix as a regex, as PEFT's ``rank_pattern``.
        modules_to_save: modules (names or dotted suffixes, as PEFT's) whose parameters train and are
            saved whole in the adapter file (format_version "2"): a new classifier head with its own
            number of classes, a task-specific norm. Replace the head before ``apply_adapters_``.
        exclude_modules: modules (names or dotted suffixes; a string: a regex over module names)
            never adapted, as PEFT's.
        version: configuration schema version (1).

    ``targets`` details (see :mod:`liedeploy.targets`): naming a module adapts all its rank >= 2
    parameters (``nn.MultiheadAttention``'s ``in_proj_weight``, a ``weight_norm`` conv's weight);
    every list item must match something; ``targets="all-linear"`` takes every Linear/Conv1D
    weight except the output layer.

    Example:
        >>> cfg = LieConfig(r=4, alpha=8, targets=["query", "value"])
    """

    r: int = 8
    alpha: float = 8.0
    expmap: str = "exact"
    targets: Optional[Union[str, Sequence[str]]] = None
    filter_fn: Optional[FilterFn] = field(default=None, compare=False, repr=False)
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: Optional[Sequence[str]] = None
    exclude_modules: Optional[Union[str, Sequence[str]]] = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"LieConfig.version must be {CONFIG_VERSION}, got {self.version!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LieConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            self.alpha == self.alpha and abs(self.alpha) != float("inf")
        ):
            raise ConfigError(f"LieConfig.alpha must be a finite number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.expmap not in EXPMAPS:
            raise ConfigError(f"LieConfig.expmap must be one of {', '.join(EXPMAPS)}, got {self.expmap!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(f"LieConfig.filter_fn must be callable (module, name) -> bool, got {self.filter_fn!r}")
        if isinstance(self.targets, str):
            if not self.targets:
                raise ConfigError("LieConfig.targets must not be an empty string")
            try:
                re.compile(self.targets)
            except re.error as exc:
                raise ConfigError(f"LieConfig.targets {self.targets!r} is not a valid regex: {exc}") from None
        elif self.targets is not None:
            targets = list(self.targets)
            bad = [t for t in targets if not isinstance(t, str) or not t]
            if bad or not targets:
                raise ConfigError(
                    f"LieConfig.targets must be a regex string or a non-empty list of names, got {self.targets!r}"
                )
            self.targets = targets
        if self.targets is None and self.filter_fn is None:
            raise ConfigError("LieConfig.targets is None and no filter_fn given: say which parameters to adapt")
        for fname in ("modules_to_save", "exclude_modules"):
            v = getattr(self, fname)
            if v is None:
                continue
            if isinstance(v, str) and fname == "exclude_modules":
                try:
                    re.compile(v)
                except re.error as exc:
                    raise ConfigError(f"LieConfig.exclude_modules {v!r} is not a valid regex: {exc}") from None
                continue
            items = [v] if isinstance(v, str) else list(v)
            if not items or not all(isinstance(i, str) and i for i in items):
                raise ConfigError(f"LieConfig.{fname} must be a non-empty list of module names, got {v!r}")
            setattr(self, fname, items)
        self.rank_pattern = _check_pattern_dict("rank_pattern", self.rank_pattern, int)
        self.alpha_pattern = _check_pattern_dict("alpha_pattern", self.alpha_pattern, float)

    # -- per-target values -------------------------------------------------------------------
    @staticmethod
    def _pattern_hit(pattern: str, param_name: str) -> bool:
        module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
        rx = re.compile(rf"(.*\.)?(?:{pattern})")
        return bool(rx.fullmatch(param_name) or (module_name and rx.fullmatch(module_name)))

    def rank_for(self, param_name: str) -> int:
        """Rank used for ``param_name`` (``rank_pattern`` first, then ``r``)."""
        for pattern, value in self.rank_pattern.items():
            if self._pattern_hit(pattern, param_name):
                return value
        return self.r

    def alpha_for(self, param_name: str) -> float:
        """Alpha used for ``param_name`` (``alpha_pattern`` first, then ``alpha``)."""
        for pattern, value in self.alpha_pattern.items():
            if self._pattern_hit(pattern, param_name):
                return value
        return self.alpha

    def scale_for(self, param_name: str) -> float:
        """alpha / r for ``param_name``."""
        return self.alpha_for(param_name) / self.rank_for(param_name)

    def describe_targets(self) -> str:
        """Human-readable description of the selection, for error messages."""
        parts = []
        if self.targets is not None:
            parts.append(f"targets={self.targets!r}")
        if self.filter_fn is not None:
            parts.append(f"filter_fn={getattr(self.filter_fn, '__name__', repr(self.filter_fn))}")
        return " and ".join(parts)

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict; ``filter_fn`` is recorded by name only (code is never serialized)."""
        d = asdict(self)
        d["filter_fn"] = None if self.filter_fn is None else getattr(self.filter_fn, "__qualname__", "callable")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, filter_fn: Optional[FilterFn] = None) -> "LieConfig":
        """Rebuild a config from :meth:`to_dict` output (pass ``filter_fn`` again if one was used)."""
        known = {"r", "alpha", "expmap", "targets", "rank_pattern", "alpha_pattern", "modules_to_save",
                 "exclude_modules", "version"}
        return cls(**{k: v for k, v in d.items() if k in known}, filter_fn=filter_fn)
