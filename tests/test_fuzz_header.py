"""Fuzz: any byte string is either read correctly or refused with AdapterFileError, never anything else."""

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
