"""Stages on a Ray cluster of two nodes: the tiny recipe with sft and DPO trained data-parallel on two Ray
workers (one per node) and evaluation's generation spread over Ray tasks, against the same recipe in one
process. The Ray run meets two faults on the way: the second node goes away while sft trains (the stage fails
as transient and Prefect retries it on a new node, from the stored checkpoint), and a DPO worker is SIGKILLed
(Ray Train restarts the workers inside the attempt, from the stored checkpoint).

Tolerance: the Ray run keeps the recipe's global batch (each of 2 workers takes half), so it sees the same
samples per step as one process; it is not bit-equal, for the reasons tests/e2e/test_distributed.py gives
(loss averaged per rank, sums in another order). We allow 1% relative on the losses, as there."""

import os
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from tasks.machinery.store import ArtifactStore, Ref
from tests.conftest import posttrain_home
from tests.e2e.conftest import run_cli
from tests.servers import task_run_states

from .conftest import ray_overrides

pytestmark = pytest.mark.ray
# checkpoints in both runs (they are part of the key), so the two runs' sft keys can be compared
CHECKPOINTS = ["sft.training.checkpoint_steps=4", "align.training.checkpoint_steps=2"]
ON_RAY = ["orchestration.stage_engines={sft: ray, align: ray, evaluate: ray}",
          "orchestration.ray.stages={sft: {max_failures: 0}, align: {max_failures: 1}}",
          "orchestration.retry_delay_seconds=[1]"]


def by_name(summary):
    return {s["name"]: s for s in summary["stages"]}


def _ray_run_with_faults(cluster, home, tmp_path) -> dict:
    """The Ray run, in a thread; this thread takes the second node away once sft's checkpoint of step 4 is
    stored (the ranks wait after step 6), adds a new node and lets sft go on. DPO's first worker to reach step
    3 is killed."""
    faults = {"POSTTRAIN_HOLD_AT": f"sft:step-6={tmp_path / 'gate'}", "POSTTRAIN_KILL_AT": "align:step-3",
              "POSTTRAIN_KILL_ONCE": str(tmp_path / "killed")}
    os.environ.update(faults)
    result = {}

    def pipeline():
        with posttrain_home(home):
            result["code"], result["summary"] = run_cli(home, *ray_overrides(cluster), *ON_RAY, *CHECKPOINTS)

    thread = threading.Thread(target=pipeline)
    try:
        thread.start()
        store, deadline = ArtifactStore(str(home / "artifacts")), time.monotonic() + 900
        while thread.is_alive() and time.monotonic() < deadline and not any(
                k.endswith("step000000004") and store.lookup("sft.checkpoints", k)
                for k in store.list_keys("sft.checkpoints")):
            time.sleep(0.5)
        assert thread.is_alive(), f"the run ended before sft's checkpoint of step 4: {result}"
        [second] = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
        cluster.remove_node(second)
        cluster.add_node(num_cpus=1)
        (tmp_path / "gate").touch()
        thread.join(timeout=900)
    finally:
        for name in faults:
            os.environ.pop(name, None)
    assert not thread.is_alive()
    return {**result, "killed": (tmp_path / "killed").exists()}


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    local_home = tmp_path_factory.mktemp("home-local")
    with posttrain_home(local_home):
        code, local = run_cli(local_home, *CHECKPOINTS)
    assert code == 0, local
    ray_home = tmp_path_factory.mktemp("home-ray")
    on_ray = _ray_run_with_faults(ray_cluster, ray_home, tmp_path_factory.mktemp("faults"))
    assert on_ray["code"] == 0, on_ray["summary"]
    return {"local": (local_home, local), "ray": (ray_home, on_ray["summary"]), "killed": on_ray["killed"]}


def test_sft_and_dpo_train_on_two_workers_on_two_nodes_and_match_one_process(runs):
    local, on_ray = by_name(runs["local"][1]), by_name(runs["ray"][1])
    assert [s["status"] for s in runs["ray"][1]["stages"]] == ["completed"] * len(local)
    for stage in ("prepare_data", "pretrain", "sft"):  # the stages whose inputs are the same in both runs
        assert on_ray[stage]["cache_key"] == local[stage]["cache_key"], "where a stage runs is not in its key"
    for stage in ("sft", "align"):
        one, two = local[stage]["metrics"], on_ray[stage]["metrics"]
        print(stage, {k: (one[k], two[k]) for k in one if k.endswith("loss")})
        assert one["train/processes"] == 1 and two["train/processes"] == 2
        assert two["ray/workers"] == 2 and two["ray/nodes"] == 2, "one worker on each node"
        assert two["train/steps"] == one["train/steps"]
        for name in [k for k in one if k in ("eval/loss", "train/final_loss", "train/first_loss")]:
            assert two[name] == pytest.approx(one[name], rel=0.01), name
    assert "ray/workers" not in on_ray["reward"]["metrics"], "reward ran in the pipeline's process"
    assert on_ray["evaluate"]["metrics"].keys() == local["evaluate"]["metrics"].keys()


def _task_runs(summary):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        assert set(task_run_states(client, [summary["flow_run_id"]], by_name(summary)).values()) == {"Completed"}
        return {t.name: t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[summary["flow_run_id"]])))}


def test_a_node_that_goes_away_is_a_transient_failure_that_prefect_retries_from_the_checkpoint(runs):
    _, summary = runs["ray"]
    sft = by_name(summary)["sft"]["metrics"]
    assert sft["train/resumed_from_step"] == 4 and sft["ray/nodes"] == 2
    assert _task_runs(summary)["sft"].run_count == 2, "one failed attempt, one Prefect retry"


def test_a_killed_worker_is_restarted_by_ray_train_from_the_checkpoint_inside_the_attempt(runs):
    _, summary = runs["ray"]
    assert runs["killed"], "a DPO worker reached step 3 and was killed"
    assert by_name(summary)["align"]["metrics"]["train/resumed_from_step"] == 2
    assert _task_runs(summary)["align"].run_count == 1, "no Prefect retry: Ray Train restarted the workers"


def test_stage_runs_link_the_ray_job_and_dashboard(runs):
    _, summary = runs["ray"]
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    stages = by_name(summary)
    for stage in ("sft", "align", "evaluate"):
        tags = client.get_run(stages[stage]["mlflow_run_id"]).data.tags
        assert tags["posttrain.ray.job_id"]
        assert tags["posttrain.ray.dashboard"].startswith("http://")
        assert tags["posttrain.ray.job_url"] == f"{tags['posttrain.ray.dashboard']}/#/jobs/{tags['posttrain.ray.job_id']}"
    assert client.get_run(stages["sft"]["mlflow_run_id"]).data.tags["posttrain.ray.train_run"].startswith("sft-")
    assert "posttrain.ray.job_id" not in client.get_run(stages["reward"]["mlflow_run_id"]).data.tags


def test_generation_and_scoring_fanned_out_over_ray_equal_one_process(runs, ray_cluster):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.machinery import ray_engine
    from tasks.blocks.generation import generate, reply_logprobs

    home, summary = runs["local"]
    sft = by_name(summary)["sft"]
    with posttrain_home(home):
        folder = ArtifactStore(summary["storage_root"]).materialize(Ref(sft["output_uri"], sft["output_digest"]))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompts = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a in range(5) for b in range(4)]
    settings = {"address": ray_cluster.address, "workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0}

    def everything():
        return (generate(model, tokenizer, prompts, 6, batch_size=6),
                generate(model, tokenizer, prompts, 6, batch_size=6, do_sample=True, seed=3),
                reply_logprobs(model, tokenizer, prompts, ["4"] * len(prompts), batch_size=6))

    greedy, sampled, logprobs = everything()
    with ray_engine.active(settings):
        greedy_ray, sampled_ray, logprobs_ray = everything()
    assert greedy_ray == greedy
    assert sampled_ray == sampled and sampled != greedy
    assert logprobs_ray == pytest.approx(logprobs, abs=1e-5)


def test_worker_failures_are_classified_as_the_stage_retry_expects():
    """A worker's own error that fails the same way again is not transient; a worker or node that went away,
    or a transient error in a worker, is."""
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    from tasks.machinery.ray_engine import RayStageFailed, TransientRayFailure, _failure
    from tasks.machinery.context import is_transient

    bad_data = _failure(WorkerGroupError("rank 1 failed", {1: ValueError("no sft/train split")}), is_transient)
    assert type(bad_data) is RayStageFailed and not is_transient(bad_data)
    assert str(bad_data) == "Ray worker of rank 1 failed: ValueError: no sft/train split"
    for error in (ActorDiedError(), ConnectionError("S3 went away")):
        failure = _failure(WorkerGroupError("rank 0 failed", {0: error, 1: ValueError("peer")}), is_transient)
        assert isinstance(failure, TransientRayFailure) and is_transient(failure)
        assert failure.args[0].startswith("Ray worker of rank 0 failed") and "ranks 1 failed too" in failure.args[0]
