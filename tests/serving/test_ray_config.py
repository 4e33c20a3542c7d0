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
