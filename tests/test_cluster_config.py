"""`cluster.yaml` checked offline: first by Ray's own cluster-launcher validation (the steps
`ray up` runs before it touches a cloud: defaults merged, then the JSON schema), then for what
this project needs from it: GPU workers, the project installed on every node, shared storage
for Tune, authentication on and the dashboard private.
"""

import copy
import re
import subprocess
import sys

import pytest
import ray
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from cifar_ray.config import load_yaml
from cifar_ray.search.settings import SearchConfig
from tests.conftest import ROOT

GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5", "p5e")


@pytest.fixture
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does first (ray.autoscaler._private.commands._bootstrap_config)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_accepts_the_cluster_config(cluster):
    prepared = ray_validate(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "gpu"}


def test_every_command_is_one_valid_shell_line(cluster):
    """A YAML folding slip (a more-indented line keeps its newline) splits a command in two."""
    for key in ("initialization_commands", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        for command in cluster[key]:
            assert "\n" not in command, command
            assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command


@pytest.mark.parametrize("break_it", [
    lambda c: c["available_node_types"]["gpu"].update(min_worker=0),  # a typo'd key
    lambda c: c["docker"].update(image=["not", "a", "string"]),
    lambda c: c.pop("provider"),
])
def test_ray_validation_rejects_a_broken_config(cluster, break_it):
    break_it(cluster)
    with pytest.raises((ValidationError, ValueError, KeyError)):
        ray_validate(cluster)


def test_gpu_workers_autoscale_and_match_the_cluster_search(cluster):
    nodes = cluster["available_node_types"]
    head, gpu = nodes[cluster["head_node_type"]], nodes["gpu"]
    assert head["node_config"]["InstanceType"].split(".")[0] not in GPU_FAMILIES  # CPU head
    assert gpu["node_config"]["InstanceType"].split(".")[0] in GPU_FAMILIES
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cluster["max_workers"]
    search = SearchConfig.from_dict(load_yaml(ROOT / "experiments/search_cluster.yaml"))
    assert search.tune.address == "auto"
    assert search.tune.gpus_per_worker == 1
    assert search.tune.max_concurrent == gpu["max_workers"]  # one trial per GPU node
    assert search.tune.cpus_per_worker <= 8  # a g5.2xlarge's vCPUs


def test_image_matches_the_pinned_ray_and_python(cluster):
    (pinned,) = re.findall(r'"ray\[[a-z,]+\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned == ray.__version__
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert cluster["docker"]["image"] == f"rayproject/ray:{pinned}-{python}-gpu"


def test_every_node_gets_and_installs_the_project(cluster):
    assert cluster["file_mounts"]["/home/ray/cifar_ray"] == "."
    assert "pip install -e /home/ray/cifar_ray" in cluster["setup_commands"]
    # The virtual env (GBs), data and outputs stay home: .gitignore filters the copy.
    assert ".gitignore" in cluster["rsync_filter"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv/", "/data/", "/outputs/"} <= set(ignored)


def test_results_and_data_go_to_storage_every_node_mounts(cluster):
    init = " ".join(cluster["initialization_commands"])
    assert re.search(r"mount -t nfs4 .* /mnt/shared", init)
    assert "-v /mnt/shared:/mnt/shared" in cluster["docker"]["run_options"]
    search = load_yaml(ROOT / "experiments/search_cluster.yaml")
    for path in (search["trainer"]["output_dir"], search["data"]["data_dir"]):
        assert path.startswith("/mnt/shared/")


def test_authentication_on_and_dashboard_private(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token ray start" in command
    (head_start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in cluster["setup_commands"])


def test_what_the_user_must_set_is_marked(cluster):
    """The account-specific values are marked SET-ME, and each is explained in the header."""
    text = (ROOT / "cluster.yaml").read_text()
    assert text.count("ami-SET-ME") == 1 and text.count("fs-SET-ME") == 1
    assert text.count("sg-SET-ME") == 1
    nodes = cluster["available_node_types"]
    assert nodes["head"]["node_config"]["ImageId"] == nodes["gpu"]["node_config"]["ImageId"]
    readme = (ROOT / "README.md").read_text()
    assert "SET-ME" in readme and "ray up cluster.yaml" in readme


def test_no_node_gets_rays_default_security_group_with_ssh_open_to_the_world(cluster):
    """Ray's AWS launcher makes a group with SSH open to 0.0.0.0/0 for every node type that
    names no SecurityGroupIds; each node type names the user's own group, whose SSH rule the
    header restricts to the user's address."""
    for name, node in cluster["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds") == ["sg-SET-ME"], name
    text = (ROOT / "cluster.yaml").read_text()
    assert "--protocol tcp --port 22 --cidr YOUR.PUBLIC.IP/32" in text
    readme = (ROOT / "README.md").read_text()
    assert "SSH" in readme and "SecurityGroupIds" in readme
