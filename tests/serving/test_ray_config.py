"""The sample deployment configs (serve deploy YAML, KubeRay RayService) carry arguments build_app accepts."""

import os

import pytest

yaml = pytest.importorskip("yaml")

from liedeploy.errors import ConfigError  # noqa: E402
from liedeploy.serving.ray import parse_args  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serve_config_and_rayservice_arguments_parse():
    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy", "serve_config.yaml")))
    app = cfg["applications"][0]
    assert app["import_path"] == "liedeploy.serving.ray:build_app"
    s = parse_args(app["args"])
    assert s["min_replicas"] == 1 and s["max_replicas"] == 4 and s["input_shape"] == (1, 3, 224, 224)
    assert s["cache_bytes"] == 4 * 10**9
    svc = yaml.safe_load(open(os.path.join(ROOT, "deploy", "kuberay-rayservice.yaml")))
    inner = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert parse_args(inner["applications"][0]["args"])["max_tasks_per_replica"] == 16


def test_builder_arguments_are_checked():
    base = {"model": "m:f", "weights": "w.safetensors", "adapters": "tasks/", "input_shape": "1,3,8,8"}
    with pytest.raises(ConfigError, match="unknown build_app argument 'replicas'"):
        parse_args({**base, "replicas": "2"})
    with pytest.raises(ConfigError, match="build_app needs adapters="):
        parse_args({k: v for k, v in base.items() if k != "adapters"})
    with pytest.raises(ConfigError, match="not a number"):
        parse_args({**base, "num_replicas": "two"})
    s = parse_args({**base, "input": "input_ids:INT64:-1,16;attention_mask:INT64:-1,16", "affinity": "false"})
    assert [i.name for i in s["inputs"]] == ["input_ids", "attention_mask"] and s["affinity"] is False


def test_replicas_are_sized_to_fit_a_small_cluster_or_refused_naming_the_setting():
    from liedeploy import ConfigError
    from liedeploy.serving.ray import fit_replicas

    said = []
    assert fit_replicas(1, None, 2.0, log=said.append) == {"num_cpus": 1.0} and said == []
    opts = fit_replicas(2, None, 2.0, log=said.append)  # 2 x 1 CPU + the ingress: sized down
    assert opts == {"num_cpus": 0.95} and "replica_num_cpus sized to 0.95" in said[0]
    assert 2 * opts["num_cpus"] + 0.1 <= 2.0
    with pytest.raises(ConfigError, match=r"2 replica\(s\) x replica_num_cpus=1 plus the ingress's 0.1 need 2.1 CPUs "
                                          r"and the Ray cluster has 2: lower replica_num_cpus or num_replicas"):
        fit_replicas(2, 1.0, 2.0)
    assert fit_replicas(2, 0.5, 2.0) == {"num_cpus": 0.5}
    assert fit_replicas(3, None, None) == {"num_cpus": 1.0}  # not connected: nothing to check
    assert fit_replicas(2, None, 8.0, device="cuda", cluster_gpus=1.0) == {"num_cpus": 1.0, "num_gpus": 0.5}
    with pytest.raises(ConfigError, match="device=cuda but the Ray cluster has no GPU"):
        fit_replicas(1, None, 8.0, device="cuda", cluster_gpus=0.0)
