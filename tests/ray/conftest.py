"""A Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster: a head and a second node, each its
own raylet with one CPU, so two one-CPU workers are placed on different nodes), shared by the tier."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import posttrain_home

ROOT = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("ray") is None:  # the [ray] extra is not installed
    pytest.skip("Ray is not installed (pip install -e '.[ray]')", allow_module_level=True)


@pytest.fixture(scope="session", autouse=True)
def prefect_server(prefect_harness):
    yield


@pytest.fixture(scope="module")  # stopped once the tier is done: its daemons would slow every test after it
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def state_home(tmp_path_factory):
    with posttrain_home(tmp_path_factory.mktemp("posttrain-home")) as home:
        yield home


def ray_overrides(cluster, **settings) -> list[str]:
    """The cluster and its worker resources (which stages run on it: orchestration.engine or stage_engines)."""
    values = {"address": cluster.address, "workers": 2, "cpus_per_worker": 1, **settings}
    return [f"orchestration.ray.{k}={json.dumps(v)}" for k, v in values.items()]
