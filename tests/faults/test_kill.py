"""SIGKILL inside each stage, one stage per run: the next run resumes where the last one died.

Run k is killed inside stage k; run k+1 takes the finished stages from cache, redoes stage k (a
training stage from its newest checkpoint) and is killed in stage k+1. Before the last run, one
committed output (sft's weights) is corrupted on disk. The last run detects it, sets it aside,
recomputes it, completes, and its outputs equal an uninterrupted run's, digest for digest."""

import signal

import pytest
from mlflow.tracking import MlflowClient

from tasks.machinery.context import store_area
from tasks.machinery.store import MANIFEST, ArtifactStore, Ref

from .conftest import STAGES, Pipeline, digests, statuses

pytestmark = pytest.mark.faults

# Where each stage dies: after an optimizer step past its first checkpoint, or with every output file
# written and the manifest not yet (the worst moment for an output that is not committed atomically).
KILL_AT = {
    "prepare_data": "prepare_data:commit",
    "pretrain": "pretrain:step-6",
    "sft": "sft:step-6",
    "reward": "reward:step-6",
    "align": "align:step-3",
    "evaluate": "evaluate:commit",
}
CHECKPOINT_BEFORE_KILL = {"pretrain": 4, "sft": 4, "reward": 4, "align": 2}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, prefect_api, reference):
    home = tmp_path_factory.mktemp("kill-chain")
    keys = {s["name"]: s["cache_key"] for s in reference["summary"]["stages"]}
    store = ArtifactStore(str(home / "artifacts"))
    kills = {}
    for stage in STAGES:
        p = Pipeline(home, prefect_api, env={"POSTTRAIN_KILL_AT": KILL_AT[stage]})
        code, _ = p.wait()
        mlflow = MlflowClient(f"sqlite:///{home}/mlflow.db")
        runs = mlflow.search_runs(mlflow.search_experiments()[0].experiment_id.split(),
                                  filter_string=f"tags.`posttrain.cache_key` = '{keys[stage]}'")
        kills[stage] = {
            "code": code, "log": p.output(),
            "committed": store.lookup(store_area(keys[stage]), keys[stage]) is not None,
            "checkpoints": store.list_keys(f"{store_area(keys[stage])}.checkpoints", prefix=keys[stage]),
            "mlflow_statuses": sorted(r.info.status for r in runs),
        }
    resumed = {stage: store.read_manifest(store.uri_for(store_area(keys[stage]), keys[stage]))["metadata"]["metrics"]
               .get("train/resumed_from_step") for stage in CHECKPOINT_BEFORE_KILL}
    weights = next((home / "artifacts" / "sft" / keys["sft"]).glob("attempt-*/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    last = Pipeline(home, prefect_api)
    code, final = last.wait()
    return {"home": home, "keys": keys, "kills": kills, "final_code": code, "final": final, "store": store,
            "resumed": resumed, "final_log": last.log.read_text(), "corrupted": weights}


def test_each_run_died_by_sigkill_inside_its_stage(chain):
    for stage, kill in chain["kills"].items():
        assert kill["code"] == -signal.SIGKILL, f"{stage}: exit {kill['code']}\n{kill['log']}"
        assert f"[{stage}] running" in kill["log"], f"{stage} never started before the kill"


def test_a_killed_stage_leaves_no_complete_output_and_is_never_finished_in_mlflow(chain):
    for stage, kill in chain["kills"].items():
        assert not kill["committed"], f"{stage}: a killed stage's output reads as complete"
        assert "FINISHED" not in kill["mlflow_statuses"], f"{stage}: {kill['mlflow_statuses']}"


def test_a_killed_training_stage_leaves_its_checkpoint_and_the_next_run_resumes_from_it(chain):
    store, keys = chain["store"], chain["keys"]
    for stage, step in CHECKPOINT_BEFORE_KILL.items():
        assert chain["kills"][stage]["checkpoints"] == [f"{keys[stage]}-step{step:09d}"], stage
        assert chain["resumed"][stage] == step, stage
        assert store.list_keys(f"{store_area(keys[stage])}.checkpoints", prefix=keys[stage]) == [], \
            f"{stage}: checkpoints are discarded once the output is committed"


def test_the_last_run_completes_with_the_uninterrupted_outputs(chain, reference):
    assert chain["final_code"] == 0, chain["final_log"][-6000:]
    assert statuses(chain["final"]) == {**{s: "cached" for s in STAGES}, "sft": "completed", "evaluate": "completed"}
    assert digests(chain["final"]) == reference["digests"]
    for stage in chain["final"]["stages"]:
        assert chain["store"].problem(Ref(stage["output_uri"], stage["output_digest"])) is None, stage["name"]


def test_the_corrupted_output_was_detected_set_aside_and_recomputed(chain):
    folder = chain["home"] / "artifacts" / "sft" / chain["keys"]["sft"]
    [reason] = folder.glob(f"{MANIFEST}.corrupt-*.reason.txt")
    assert "model.safetensors does not match its recorded sha256" in reason.read_text()
    assert chain["corrupted"].exists(), "the corrupted files are kept for inspection"
    assert "does not match its recorded sha256" in chain["final_log"]
