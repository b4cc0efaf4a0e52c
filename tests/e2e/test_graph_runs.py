"""Recipes as graphs, run for real at the tiny size: branches compared by one evaluation, a loop whose
rounds are reused when it grows, plan before run, --only / --from / --refresh, an existing model (a
folder, an MLflow registry alias) as the start of DPO, and stages composed in a Python flow."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.servers import task_run_states

from .conftest import run_cli, tiny_settings

pytestmark = pytest.mark.e2e

DPO = tiny_settings("align")
DPO_TRAINING = DPO["training"]


def graph_recipe(tmp_path, name="graph", rounds=1) -> str:
    """The tiny recipe with two DPO branches (one of them looping) and one evaluation."""
    stages = {
        "data": {"kind": "prepare_data", **tiny_settings("prepare_data")},
        "base": {"kind": "pretrain", **tiny_settings("pretrain")},
        "sft": {"kind": "sft", "inputs": {"data": "data", "base": "base"}, **tiny_settings("sft")},
        "reward": {"kind": "reward", "inputs": {"data": "data", "init": "sft"}, **tiny_settings("reward")},
        "dpo_a": {"kind": "dpo", "inputs": {"data": "data", "policy": "sft"}, **DPO, "beta": 0.1},
        "dpo_b": {"kind": "dpo", "inputs": {"data": "data", "policy": "sft"}, **DPO, "beta": 0.5, "rounds": rounds},
        "evaluate": {"kind": "evaluate", **tiny_settings("evaluate"),
                     "inputs": {"data": "data", "reward": "reward", "base": "base", "sft": "sft",
                                "dpo_a": "dpo_a", "dpo_b": "dpo_b"}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "seed": 0, "stages": stages}, sort_keys=False))
    return str(path)


def by_name(summary):
    return {s["name"]: s for s in summary["stages"]}


def plan(home, recipe, *args):
    from flows.cli import main

    out = home / "plan.json"
    assert main(["plan", "--config", recipe, "--json", str(out), *args]) == 0
    return {row["name"]: row for row in json.loads(out.read_text())["stages"]}


@pytest.fixture(scope="module")
def branches(state_home, tmp_path_factory):
    recipe = graph_recipe(tmp_path_factory.mktemp("recipes"), rounds=2)
    before = plan(state_home, recipe)
    code, summary = run_cli(state_home, config=recipe)
    assert code == 0, summary
    return recipe, before, summary


def test_plan_before_the_first_run_says_everything_runs_and_why(branches):
    _, before, _ = branches
    assert before["data"]["action"] == "run" and before["data"]["cache_key"].startswith("prepare_data-")
    assert before["data"]["reason"] == "never ran: no stored output of this stage"
    assert before["sft"]["action"] == "run" and before["sft"]["cache_key"] is None
    assert before["sft"]["reason"] == "its input data comes from data, which runs first"
    assert set(before) == {"data", "base", "sft", "reward", "dpo_a", "dpo_b.round1", "dpo_b.round2", "evaluate"}


def test_branches_each_get_their_own_row_metrics_and_task_run(branches):
    _, _, summary = branches
    stages = by_name(summary)
    assert [s["status"] for s in summary["stages"]] == ["completed"] * 8
    assert stages["dpo_a"]["kind"] == stages["dpo_b.round2"]["kind"] == "dpo"
    assert stages["dpo_a"]["output_digest"] != stages["dpo_b.round2"]["output_digest"]
    for branch in ("dpo_a", "dpo_b"):
        assert 0.0 <= summary["metrics"][f"eval/{branch}/win_rate_vs_sft"] <= 1.0
        assert f"eval/{branch}/kl_to_sft" in summary["metrics"]
    from prefect import get_client

    with get_client(sync_client=True) as client:
        states = task_run_states(client, [summary["flow_run_id"]], stages)
    assert sorted(states) == sorted(stages), "task runs are named after their recipe instance"


def test_each_round_has_its_own_key_folder_and_mlflow_run(branches):
    _, _, summary = branches
    stages = by_name(summary)
    r1, r2 = stages["dpo_b.round1"], stages["dpo_b.round2"]
    assert r1["cache_key"] != r2["cache_key"] and r1["output_uri"] != r2["output_uri"]
    assert (r1["round"], r2["round"]) == (1, 2)
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    tags = client.get_run(r2["mlflow_run_id"]).data.tags
    assert tags["posttrain.stage"] == "dpo_b.round2" and tags["posttrain.kind"] == "dpo"
    assert tags["posttrain.input.policy"].startswith(r1["output_uri"])


def test_plan_after_a_change_names_the_setting_and_what_follows(branches, state_home):
    recipe, _, _ = branches
    after = plan(state_home, recipe, "--set", "dpo_a.beta=0.3")
    assert {n: r["action"] for n, r in after.items() if r["action"] == "run"} == {"dpo_a": "run", "evaluate": "run"}
    assert after["dpo_a"]["reason"] == "setting beta 0.1 -> 0.3"
    assert "comes from dpo_a, which runs first" in after["evaluate"]["reason"]
    assert after["dpo_b.round2"]["action"] == "cached"


def test_raising_the_rounds_reuses_the_rounds_already_done(branches, state_home):
    recipe, _, before = branches
    code, summary = run_cli(state_home, "dpo_b.rounds=3", config=recipe)
    assert code == 0
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses["dpo_b.round1"] == statuses["dpo_b.round2"] == "cached"
    assert statuses["dpo_b.round3"] == "completed" and statuses["evaluate"] == "completed"
    assert by_name(summary)["dpo_b.round2"]["cache_key"] == by_name(before)["dpo_b.round2"]["cache_key"]


def test_only_runs_one_stage_from_stored_inputs(branches, state_home):
    recipe, _, _ = branches
    code, summary = run_cli(state_home, "dpo_a.beta=0.2", config=recipe, extra=["--only", "dpo_a"])
    assert code == 0
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses == {"data": "cached", "base": "cached", "sft": "cached", "dpo_a": "completed"}


def test_only_refuses_when_an_input_is_not_in_the_store(state_home, tmp_path):
    recipe = graph_recipe(tmp_path, name="fresh")
    code, summary = run_cli(state_home, "storage.root=" + str(tmp_path / "empty-store"), config=recipe,
                            extra=["--only", "dpo_a"])
    assert code == 1
    failed = by_name(summary)["data"]
    assert failed["status"] == "failed" and "posttrain run --only data" in failed["error"]
    assert "dpo_a" not in by_name(summary), "nothing was trained"


def test_from_and_refresh(branches, state_home):
    recipe, _, before = branches
    code, summary = run_cli(state_home, config=recipe, extra=["--from", "evaluate", "--refresh", "evaluate"])
    assert code == 0
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses["evaluate"] == "completed" and {v for k, v in statuses.items() if k != "evaluate"} == {"cached"}
    # CPU runs are exact: the recomputed evaluation equals the stored one it replaced
    assert by_name(summary)["evaluate"]["metrics"] == by_name(before)["evaluate"]["metrics"]


def test_dpo_from_an_existing_model_folder_and_from_a_registry_alias(branches, state_home, prepared):
    import mlflow

    _, _, summary = branches
    _, root = prepared
    local = ["data.preference.source=synthetic:arithmetic/preference", "data.preference.columns={}",
             "data.eval.source=synthetic:arithmetic/eval", "data.eval_fraction=0.1",
             "dpo.training.max_steps=4", "dpo.training.batch_size=8", "dpo.training.max_length=128",
             "dpo.training.gradient_accumulation_steps=1", "evaluate.max_prompts=8", "evaluate.max_new_tokens=4"]
    code, from_folder = run_cli(state_home, *local, f"dpo.inputs.policy={root / 'base'}",
                                f"evaluate.inputs.base={root / 'base'}", config="configs/dpo-from-model.yaml")
    assert code == 0, from_folder
    assert [s["name"] for s in from_folder["stages"]] == ["data", "dpo", "evaluate"]
    assert "eval/policy/win_rate_vs_base" not in from_folder["metrics"]  # no reward model in this recipe
    assert "eval/policy/kl_to_base" in from_folder["metrics"]

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    policy_run = by_name(summary)["dpo_a"]["mlflow_run_id"]  # its policy is logged as run artifacts
    client.create_registered_model("tiny-policy")
    version = client.create_model_version("tiny-policy", f"runs:/{policy_run}/policy", run_id=policy_run)
    client.set_registered_model_alias("tiny-policy", "champion", version.version)
    mlflow.set_tracking_uri(summary["tracking_uri"])
    code, from_registry = run_cli(state_home, *local, "dpo.inputs.policy=models:/tiny-policy@champion",
                                  f"evaluate.inputs.base={root / 'base'}", config="configs/dpo-from-model.yaml")
    assert code == 0, from_registry
    tags = client.get_run(by_name(from_registry)["dpo"]["mlflow_run_id"]).data.tags
    assert tags["posttrain.input.policy"].startswith(f"models:/tiny-policy/{version.version}@")


def test_stages_compose_in_a_python_flow(state_home):
    from flows.example_flow import beta_sweep

    tiny = dict(base_settings=tiny_settings("pretrain"),
                sft_training=tiny_settings("sft")["training"], reward_training=tiny_settings("reward")["training"],
                dpo_training=DPO_TRAINING, evaluate_settings=tiny_settings("evaluate"))
    first = beta_sweep(betas=[0.1, 0.3], **tiny)
    assert set(first["win_rates"]) == {0.1, 0.3} and first["best_beta"] in (0.1, 0.3)
    again = beta_sweep(betas=[0.1, 0.3, 0.6], **tiny)
    statuses = {s["name"]: s["status"] for s in again["summary"]["stages"]}
    assert statuses["dpo_beta06"] == "completed" and statuses["evaluate"] == "completed"
    assert {statuses[n] for n in ("data", "base", "sft", "reward", "dpo_beta01", "dpo_beta03")} == {"cached"}
