"""cluster.yaml (the `ray up` example) against Ray's own cluster-config schema, offline."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_validates_against_ray_schema_after_ray_up_defaults(config: dict) -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it, merged with AWS defaults


def test_schema_check_is_not_vacuous(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(config)
    broken["available_node_types"]["worker.gpu"]["node_config_typo"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_plus_gpu_workers_on_ray_image_matching_installed_ray(config: dict) -> None:
    import ray

    head = config["head_node_type"]
    workers = [name for name in config["available_node_types"] if name != head]
    assert workers, "needs at least one worker node type"
    assert config["available_node_types"][head]["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    gpu_types = ("g5.", "g6.", "g6e.", "p4d.", "p5.")
    assert any(config["available_node_types"][w]["node_config"]["InstanceType"].startswith(gpu_types) for w in workers)
    image = config["docker"]["image"]
    assert re.fullmatch(r"rayproject/ray:[0-9.]+-py311-gpu", image)
    assert image.split(":")[1].split("-")[0] == ray.__version__  # driver, Jobs client and cluster on one Ray


def test_installs_sdfeat_with_pinned_cuda_torch_and_keeps_dashboard_local(config: dict) -> None:
    setup = " ".join(config["setup_commands"])
    assert re.search(r"torch==\d+\.\d+\.\d+\S*\s+--index-url https://download\.pytorch\.org/whl/cu\d+", setup)
    assert "pip install" in setup and "~/sdfeat" in setup
    assert setup.index("torch==") < setup.index("~/sdfeat")  # torch first, so sdfeat cannot pull another build
    assert "." in config["file_mounts"].values()
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_holds_no_credentials() -> None:
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    lowered = text.lower()
    for word in ("aws_access_key_id", "aws_secret_access_key", "ssh_private_key:", "password"):
        assert word not in lowered


# vCPUs and GPUs of the GPU instance types this file may name (AWS's published figures)
GPU_INSTANCES = {"p5.48xlarge": (192, 8), "p4d.24xlarge": (96, 8), "g6e.12xlarge": (48, 4), "g5.12xlarge": (48, 4),
                 "g5.2xlarge": (8, 1), "g5.xlarge": (4, 1), "g6.xlarge": (4, 1)}


def test_the_gpu_node_has_the_cpus_to_feed_its_gpus(config: dict) -> None:
    """The host's measured cost per image (decode, staging, writes; `gpu_rates.json` "host", from
    benchmarks/bench_pipeline.py) at the cold target of 250 img/s per GPU, on physical cores (2 vCPUs each),
    fits the vCPUs that come with each GPU of the worker node type, with the launching thread's core besides."""
    from sdfeat.extract.driver import GPU_ACTOR_CPUS_MAX
    from sdfeat.planning.rates import host_costs

    cold = max(costs["cold"] for costs in host_costs().values())  # CPU-s per image, the costlier job
    need_vcpus = 2 * (cold * 250 + 1)
    for name, node in config["available_node_types"].items():
        instance = node["node_config"]["InstanceType"]
        if name == config["head_node_type"]:
            continue
        vcpus, gpus = GPU_INSTANCES[instance]
        per_gpu = vcpus / gpus
        assert per_gpu >= need_vcpus, (instance, per_gpu, need_vcpus)
        assert min(per_gpu, GPU_ACTOR_CPUS_MAX) >= need_vcpus  # and each actor asks for enough of them
