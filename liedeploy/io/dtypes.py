"""The one dtype table: safetensors dtype names and what they are in torch, numpy and on the CLI.

Torch-free (``inspect`` and the header parser run without torch); torch dtypes are looked up by
name when asked for.
"""

from __future__ import annotations

__all__ = [
    "DTYPES",
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "FULL_DTYPES",
    "CLI_DTYPES",
    "st_to_torch",
    "torch_to_st",
    "torch_name",
    "numpy_storage",
    "cli_to_torch",
]

# safetensors name: (bytes per element, torch dtype name, numpy dtype that holds the bytes)
DTYPES = {
    "F64": (8, "float64", "float64"),
    "F32": (4, "float32", "float32"),
    "F16": (2, "float16", "float16"),
    "BF16": (2, "bfloat16", "uint16"),  # numpy has no bfloat16: the raw 16 bits
    "I64": (8, "int64", "int64"),
    "I32": (4, "int32", "int32"),
    "I16": (2, "int16", "int16"),
    "I8": (1, "int8", "int8"),
    "U8": (1, "uint8", "uint8"),
    "BOOL": (1, "bool", "bool"),
}
DTYPE_SIZES = {k: v[0] for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what factors and merged weights may be
FULL_DTYPES = ("F32", "F16", "BF16")  # what a format-2 full tensor may be
# --dtype values (merge, export) -> safetensors name
CLI_DTYPES = {"fp32": "F32", "float32": "F32", "fp16": "F16", "float16": "F16", "half": "F16",
              "bf16": "BF16", "bfloat16": "BF16"}


def torch_name(st: str) -> str:
    """``"F32"`` -> ``"float32"`` (unknown names are returned as they are)."""
    return DTYPES[st][1] if st in DTYPES else st


def st_to_torch(st: str):
    """The torch dtype of a safetensors dtype name."""
    import torch

    return getattr(torch, DTYPES[st][1])


def torch_to_st(dtype) -> str:
    """The safetensors name of a torch dtype (KeyError for one safetensors cannot hold)."""
    name = str(dtype).replace("torch.", "")
    for st, (_, tname, _) in DTYPES.items():
        if tname == name:
            return st
    raise KeyError(dtype)


def numpy_storage(st: str):
    """The numpy dtype that views a tensor's stored bytes (``uint16`` for BF16)."""
    import numpy as np

    return np.dtype(DTYPES[st][2])


def cli_to_torch(alias: str):
    """The torch dtype of a ``--dtype`` value (KeyError if it is not one)."""
    return st_to_torch(CLI_DTYPES[alias])
