"""Tensor specs of the Open Inference Protocol v2: datatypes, shapes, input flags, output names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from liedeploy.errors import ConfigError

__all__ = ["TensorSpec", "DATATYPES", "NUMPY_TO_DATATYPE", "parse_input_flag", "default_input", "flatten_named"]

# OIP v2 datatype -> numpy dtype (BYTES and BF16 have no numpy tensor form here)
DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
NUMPY_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """``name``, OIP ``datatype`` and ``shape`` (-1 for the batch axis and any free axis)."""

    name: str
    datatype: str
    shape: tuple

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @property
    def dtype(self):
        return DATATYPES[self.datatype]


def parse_input_flag(text: str) -> TensorSpec:
    """``"input_ids:INT64:-1,128"`` -> TensorSpec (the first axis is the batch: always -1)."""
    parts = str(text).split(":")
    if len(parts) != 3 or not parts[0]:
        raise ConfigError(f"--input must look like NAME:DATATYPE:SHAPE (e.g. input_ids:INT64:-1,128), got {text!r}")
    name, dtype, shape_text = parts
    dtype = dtype.upper()
    if dtype not in DATATYPES:
        raise ConfigError(f"--input {text!r}: datatype {dtype} is not one of {', '.join(DATATYPES)}")
    try:
        shape = tuple(int(s) for s in shape_text.split(","))
        if not shape or any(s == 0 or s < -1 for s in shape):
            raise ValueError
    except ValueError:
        raise ConfigError(f"--input {text!r}: SHAPE must be integers >= 1 or -1, separated by commas") from None
    return TensorSpec(name, dtype, (-1,) + shape[1:])


def default_input(shape: Sequence[int]) -> TensorSpec:
    """The single FP32 input of ``--input-shape`` (batch axis dynamic)."""
    return TensorSpec("input", "FP32", (-1,) + tuple(int(s) for s in shape[1:]))


def flatten_named(out: Any, prefix: str = "") -> list:
    """``[(name, tensor)]`` of a model output with stable names.

    A tensor is ``output``; a tuple or list gives ``output_0``, ``output_1``...; a dict or a
    transformers ModelOutput gives its keys (nested: ``hidden_states.0``). ``None`` entries are skipped.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        out = {k: out[k] for k in out.keys()}
    if isinstance(out, dict):
        items = []
        for k, v in out.items():
            items += flatten_named(v, f"{prefix}.{k}" if prefix else str(k))
        return items
    if isinstance(out, (list, tuple)):
        items = []
        for i, v in enumerate(out):
            items += flatten_named(v, f"{prefix}.{i}" if prefix else f"output_{i}")
        return items
    return []
