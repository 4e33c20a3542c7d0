"""Hypothesis strategies for safetensors-like files (shared by the fuzz test and benchmarks/fuzz_header.py)."""

import json
import struct

from hypothesis import strategies as st

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8))
json_values = st.recursive(_json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                              st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                           max_leaves=20)
_dims = st.lists(st.one_of(st.integers(-3, 6), st.booleans(), st.floats(-1, 4), st.text(max_size=2)), max_size=4)
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8", "", 3]),
    "shape": st.one_of(_dims, json_values),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-8, 200), st.text(max_size=2)), max_size=3), json_values),
})
_meta = st.one_of(st.none(), st.dictionaries(st.sampled_from(["format", "format_version", "expmap", "targets",
                                                              "base_sha256", "full", "name", "config"]),
                                             st.one_of(st.text(max_size=40), st.sampled_from([
                                                 "liedeploy.adapter", "1", "2", "exact", "{}", '{"w": {"shape": [2, 2], "scale": 1}}',
                                                 '{"w": "x"}', '[[[[[]]]]]']), json_values), max_size=8))
headers = st.dictionaries(st.sampled_from(["w", "w.lie_A", "w.lie_B", "v", "__metadata__"]),
                          st.one_of(_entry, json_values), max_size=4)


@st.composite
def safetensors_bytes(draw):
    """Byte strings that are often nearly valid safetensors files (and sometimes plain noise)."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=200))
    header = draw(headers)
    meta = draw(_meta)
    if meta is not None:
        header["__metadata__"] = meta
    blob = json.dumps(header, allow_nan=True).encode()
    if kind == 2:
        blob = blob[: draw(st.integers(0, len(blob)))]
    data = draw(st.binary(max_size=128))
    n = len(blob) if kind != 3 else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", n) + blob + data
