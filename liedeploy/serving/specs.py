"""Tensor specs of the Open Inference Protocol v2: datatypes, shapes, input flags, output names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from liedeploy.errors import ConfigError

__all__ = ["TensorSpec", "DATATYPES", "NUMPY_TO_DATATYPE", "parse_input_flag", "default_input", "parse_size"]

# OIP v2 datatype -> numpy dtype (BYTES and BF16 have no numpy tensor form here)
DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
NUMPY_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """``name``, OIP ``datatype`` and ``shape`` (-1 for the batch axis and any free axis).

    ``bounds``: ``(lo, hi)`` for integer ids the model looks up in an embedding of ``hi`` rows
    (found by the backend at start); values outside are refused before batching.
    """

    name: str
    datatype: str
    shape: tuple
    bounds: Optional[tuple] = None

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




_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1000000"`` -> bytes (ValueError when malformed)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"must be a size such as 512MiB, 2GB or 1000000, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
