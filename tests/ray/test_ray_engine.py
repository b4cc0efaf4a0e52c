"""Stages on a Ray cluster of two nodes: the tiny recipe with sft and DPO trained data-parallel on two Ray
workers (one per node) and evaluation's generation spread over Ray tasks, against the same recipe in one
process; a worker SIGKILLed mid-training; a node that goes away mid-training.

Tolerance: the Ray run keeps the recipe's global batch (each of 2 workers takes half), so it sees the same
samples per step as one process; it is not bit-equal, for the reasons tests/e2e/test_distributed.py gives
(loss averaged per rank, sums in another order). We allow 1% relative on the losses, as there."""

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from tasks.store import ArtifactStore, Ref
from tests.conftest import posttrain_home
from tests.e2e.conftest import run_cli
from tests.servers import task_run_states

from .conftest import ray_overrides

pytestmark = pytest.mark.ray
ON_RAY = "orchestration.stage_engines={sft: ray, align: ray, evaluate: ray}"


def by_name(summary):
    return {s["name"]: s for s in summary["stages"]}


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """The tiny recipe in one process, and with sft, align (DPO) and evaluate on the Ray cluster."""
    results = {}
    for name, overrides in (("local", []), ("ray", [*ray_overrides(ray_cluster), ON_RAY])):
        home = tmp_path_factory.mktemp(f"home-{name}")
        with posttrain_home(home):
            code, summary = run_cli(home, *overrides)
        assert code == 0, summary
        results[name] = (home, summary)
    return results


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
    assert local["reward"]["metrics"]["train/processes"] == 1 and "ray/workers" not in on_ray["reward"]["metrics"]


def test_stage_runs_link_the_ray_job_and_dashboard(runs):
    home, summary = runs["ray"]
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    stages = by_name(summary)
    for stage in ("sft", "align", "evaluate"):
        tags = client.get_run(stages[stage]["mlflow_run_id"]).data.tags
        assert tags["posttrain.ray.job_id"]
        assert tags["posttrain.ray.dashboard"].startswith("http://")
        assert tags["posttrain.ray.job_url"] == f"{tags['posttrain.ray.dashboard']}/#/jobs/{tags['posttrain.ray.job_id']}"
    assert client.get_run(stages["sft"]["mlflow_run_id"]).data.tags["posttrain.ray.train_run"].startswith("sft-")
    assert "posttrain.ray.job_id" not in client.get_run(stages["reward"]["mlflow_run_id"]).data.tags


def _load(summary, stage, home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = by_name(summary)[stage]
    with posttrain_home(home):
        folder = ArtifactStore(summary["storage_root"]).materialize(Ref(s["output_uri"], s["output_digest"]))
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_generation_and_scoring_fanned_out_over_ray_equal_one_process(runs, ray_cluster):
    from tasks import ray_engine
    from tasks.generation import generate, reply_logprobs

    home, summary = runs["local"]
    model, tokenizer = _load(summary, "sft", home)
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


def test_a_worker_killed_mid_training_resumes_from_the_stored_checkpoint(runs, ray_cluster, tmp_path, monkeypatch):
    """One of the two workers is SIGKILLed after step 8; Ray Train restarts the workers (max_failures 1) and
    both resume from the checkpoint of step 5 in the store, within the same stage attempt."""
    from flows.config import instance_settings, load_config
    from tasks.launch import run_training
    from tasks.sft import SFTStageConfig, _train
    from tasks.stage import RunEnv, StageContext
    from tests.e2e.conftest import ROOT

    home, summary = runs["local"]
    stages = by_name(summary)
    with posttrain_home(home):
        store = ArtifactStore(summary["storage_root"])
        data, base = (store.materialize(Ref(stages[n]["output_uri"], stages[n]["output_digest"]))
                      for n in ("prepare_data", "pretrain"))
    config = SFTStageConfig.model_validate(instance_settings(load_config(ROOT / "configs" / "tiny.yaml").stages["sft"]))
    config.training.max_steps, config.training.checkpoint_steps = 20, 5
    ray = {"address": ray_cluster.address, "workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0,
           "max_failures": 1}
    env = RunEnv(storage_root=str(tmp_path / "store"), tracking_uri="unused", experiment_id="0",
                 parent_run_id="unused", ray=ray)
    marker = tmp_path / "killed"
    monkeypatch.setenv("POSTTRAIN_KILL_AT", "sft:step-8")
    monkeypatch.setenv("POSTTRAIN_KILL_ONCE", str(marker))
    (tmp_path / "out").mkdir()
    metrics = run_training(_train, config.training, config, {"data": data, "base": base}, tmp_path / "out",
                           StageContext(seed=0, env=env, run_id=None, stage="sft", cache_key="sft-killed"))
    assert marker.exists(), "a worker reached step 8 and was killed"
    assert metrics["train/resumed_from_step"] == 5 and metrics["train/steps"] == 20
    assert metrics["train/processes"] == 2 and metrics["ray/nodes"] == 2
    monkeypatch.delenv("POSTTRAIN_KILL_AT")
    (tmp_path / "one").mkdir()
    single = run_training(_train, config.training, config, {"data": data, "base": base}, tmp_path / "one",
                          StageContext(seed=0, env=None, run_id=None))
    assert metrics["eval/loss"] == pytest.approx(single["eval/loss"], rel=0.01)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_node_that_goes_away_is_a_transient_failure_that_prefect_retries(runs, ray_cluster, tmp_path, monkeypatch):
    """sft on Ray with no worker restarts (max_failures 0): once its checkpoint of step 4 is in the store, the
    second node is removed while the workers wait after step 6. The stage fails as transient; Prefect retries
    it once a new node has joined, and it resumes from step 4."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    home, _ = runs["ray"]
    gate = tmp_path / "gate"
    monkeypatch.setenv("POSTTRAIN_HOLD_AT", f"sft:step-6={gate}")
    overrides = [*ray_overrides(ray_cluster, max_failures=0), ON_RAY, "sft.training.checkpoint_steps=4",
                 "orchestration.retry_delay_seconds=[1]"]
    result = {}

    def pipeline():
        with posttrain_home(home):
            result["code"], result["summary"] = run_cli(home, *overrides, extra=["--only", "sft"])

    thread = threading.Thread(target=pipeline)
    thread.start()
    store = ArtifactStore(str(home / "artifacts"))
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        if any(k.endswith("step000000004") and store.lookup("sft.checkpoints", k)
               for k in store.list_keys("sft.checkpoints")):
            break
        time.sleep(0.5)
    assert thread.is_alive(), f"the stage ended before its checkpoint of step 4: {result}"
    head = ray_cluster.head_node
    [second] = [n for n in ray_cluster.list_all_nodes() if n is not head]
    ray_cluster.remove_node(second)
    ray_cluster.add_node(num_cpus=1)
    gate.touch()
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert result["code"] == 0, result["summary"]
    sft = by_name(result["summary"])["sft"]
    assert sft["status"] == "completed"
    assert sft["metrics"]["train/resumed_from_step"] == 4 and sft["metrics"]["ray/nodes"] == 2
    with get_client(sync_client=True) as client:
        assert task_run_states(client, [result["summary"]["flow_run_id"]], ["sft"]) == {"sft": "Completed"}
        [task] = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[result["summary"]["flow_run_id"]]))) if t.name == "sft"]
    assert task.run_count == 2, "one failed attempt, one retry"


def test_a_worker_error_in_the_data_fails_at_once_naming_the_rank(runs, ray_cluster, tmp_path):
    """Retry classification is unchanged on Ray: bad input fails the same way again, so it is not transient."""
    from flows.config import instance_settings, load_config
    from tasks.launch import run_training
    from tasks.ray_engine import RayStageFailed, TransientRayFailure
    from tasks.sft import SFTStageConfig, _train
    from tasks.stage import RunEnv, StageContext, is_transient
    from tests.e2e.conftest import ROOT

    home, summary = runs["local"]
    base = by_name(summary)["pretrain"]
    with posttrain_home(home):
        base = ArtifactStore(summary["storage_root"]).materialize(Ref(base["output_uri"], base["output_digest"]))
    config = SFTStageConfig.model_validate(instance_settings(load_config(ROOT / "configs" / "tiny.yaml").stages["sft"]))
    env = RunEnv(storage_root=str(tmp_path / "store"), tracking_uri="unused", experiment_id="0",
                 parent_run_id="unused", ray={"address": ray_cluster.address, "workers": 2, "cpus_per_worker": 1.0,
                                              "gpus_per_worker": 0.0, "max_failures": 1})
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    with pytest.raises(RayStageFailed, match=r"Ray worker of rank \d failed: \w+") as failure:
        run_training(_train, config.training, config, {"data": tmp_path / "empty", "base": base}, tmp_path / "out",
                     StageContext(seed=0, env=env, run_id=None, stage="sft", cache_key="sft-bad"))
    assert not isinstance(failure.value, TransientRayFailure) and not is_transient(failure.value)
