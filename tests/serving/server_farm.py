"""The farm the `liedeploy serve` tests share: a base, 20 tasks (one corrupt, one made for another
base), their merged references, an admin token; the server started on it; small HTTP helpers.

Test modules import the fixtures by name (``from tests.serving.server_farm import farm, server``);
each module gets its own server (module scope)."""

import copy
import json
import urllib.error
import urllib.request

import pytest
import torch

from liedeploy import load_adapter, merge_
from tests.conftest import _write_adapter, save_state_dict
from tests.serving.helpers import ServerProcess
from tests.serving.models import Net

__all__ = ["N_TASKS", "ONE_TASK_BYTES", "farm", "infer_json", "metric", "ref", "request", "server", "triton_input"]

N_TASKS = 20
ONE_TASK_BYTES = (8 * 3 * 9 + 5 * 8) * 4


def request(url, method="GET", body=None, headers=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def infer_json(url, task, x, name="input", datatype="FP32"):
    body = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]}).encode()
    return request(f"{url}/v2/models/{task}/infer", "POST", body, {"Content-Type": "application/json"})


def base_and_tasks(d, n: int, seed: int, prefix: str = "task"):
    """``(base, tasks folder, refs)``: a :class:`Net` base saved as ``d/base.safetensors``, ``n``
    tasks (conv and fc adapted, adapter seeds ``seed + i``) in ``d/tasks`` named ``{prefix}{i}``, and
    ``refs``: each task's merged model, and the base under ``"base"``."""
    torch.manual_seed(0)
    base = Net().eval()
    save_state_dict(base, str(d / "base.safetensors"))
    tasks = d / "tasks"
    tasks.mkdir()
    refs = {"base": base}
    for i in range(n):
        p = _write_adapter(base, tasks / f"{prefix}{i}.safetensors", ["conv", "fc"], std=0.3, seed=seed + i)
        refs[f"{prefix}{i}"] = merge_(load_adapter(copy.deepcopy(base), p)).eval()
    return base, tasks, refs


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A base, 20 tasks (one of them with an adapter file that is corrupt), their merged references."""
    d = tmp_path_factory.mktemp("farm")
    base, tasks, refs = base_and_tasks(d, N_TASKS, seed=100)
    (tasks / "broken.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    other = Net()
    _write_adapter(other, tasks / "foreign.safetensors", ["conv"], seed=1)  # made for another base
    token = d / "token"
    token.write_text("s3cret\n")
    return {"dir": d, "base": str(d / "base.safetensors"), "tasks": str(tasks), "refs": refs, "token": str(token)}


@pytest.fixture(scope="module")
def server(farm):
    args = ["--model", "tests.serving.models:net", "--weights", farm["base"], "--adapters", farm["tasks"],
            "--input-shape", "1,3,8,8", "--cache-bytes", str(2 * ONE_TASK_BYTES), "--max-batch", "8",
            "--max-delay-ms", "2", "--max-body", "64KiB", "--admin-token-file", farm["token"]]
    with ServerProcess(args) as srv:
        yield srv


def ref(farm, task, x):
    with torch.no_grad():
        return farm["refs"][task](torch.from_numpy(x)).numpy()


def metric(text, name, labels=None):
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and (labels is None or all(s.labels.get(k) == v for k, v in labels.items())):
                return s.value
    raise KeyError(name)


def triton_input(x):
    """A tritonclient FP32 input named ``input`` holding ``x``."""
    from tritonclient.http import InferInput

    inp = InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp
