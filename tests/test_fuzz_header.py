"""Fuzz: any byte string is either read correctly or refused with AdapterFileError, never anything else."""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from liedeploy import AdapterFileError, read_adapter  # noqa: E402
from liedeploy.files.describe import describe_file  # noqa: E402
from liedeploy.io.safetensors_header import read_header  # noqa: E402
from tests.fuzz_strategies import safetensors_bytes  # noqa: E402


def check_one(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    for reader in (read_header, read_adapter, describe_file):
        try:
            reader(path)
        except AdapterFileError as exc:
            assert str(exc).startswith(path + ": ") and "\n" not in str(exc)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=safetensors_bytes())
def test_any_bytes_are_read_or_refused_with_adapter_file_error(tmp_path, data):
    check_one(str(tmp_path / "f.safetensors"), data)


def test_the_json_precheck_never_refuses_what_the_decoder_accepts():
    """Hypothesis: requests in any key order, with or without extra fields; the head precheck of a
    large body refuses only what the full decoder refuses, with the same sentence."""
    pytest.importorskip("starlette")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from liedeploy.serving.errors import BadRequest
    from liedeploy.serving.protocol import decode_infer_request, precheck_infer_json
    from liedeploy.serving.specs import TensorSpec

    specs = [TensorSpec("input", "FP32", (-1, 2, 3))]

    @settings(max_examples=300, deadline=None)
    @given(order=st.permutations(["name", "datatype", "shape", "data"]), batch=st.integers(1, 3),
           dt=st.sampled_from(["FP32", "FP64", "INT64", 7]), name=st.sampled_from(["input", "other"]),
           extra=st.booleans(), shape_ok=st.booleans())
    def check(order, batch, dt, name, extra, shape_ok):
        shape = [batch, 2, 3] if shape_ok else [batch, 3, 2, 1]
        fields = {"name": name, "datatype": dt, "shape": shape, "data": [0.5] * (batch * 6)}
        item = {k: fields[k] for k in order}
        req = ({"id": "x", "parameters": {}} if extra else {}) | {"inputs": [item]}
        body = json.dumps(req).encode()
        try:
            decode_infer_request(body, None, specs)
            full = None
        except BadRequest as exc:
            full = str(exc)
        try:
            precheck_infer_json(body, specs)
        except BadRequest as exc:
            assert full == str(exc)

    check()
