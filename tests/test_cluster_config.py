"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema and checks)."""
from __future__ import annotations

import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config() -> dict:
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def _validate(config: dict) -> dict:
    """What ``ray up`` does to the file before it calls the cloud: defaults filled in, then Ray's
    schema (ray-schema.json) and consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(config)
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_schema():
    config = _validate(_config())
    assert config["available_node_types"]["gpu_worker"]["max_workers"] == 8


def test_schema_check_catches_a_broken_config():
    config = _config()
    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="zero"):
        _validate(config)


def test_head_runs_no_tasks_and_workers_run_the_project():
    config = _config()
    assert any("--num-cpus=0" in cmd for cmd in config["head_start_ray_commands"])  # labelling happens on workers
    assert any("pip install -e /home/ubuntu/pseudolabel" in cmd for cmd in config["setup_commands"])
    assert config["head_node_type"] in config["available_node_types"]
