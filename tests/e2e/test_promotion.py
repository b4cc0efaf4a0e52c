"""Every trained model registered, the promote stage's gate, champion / challenger aliases, promotion by hand,
and the champion as another recipe's input."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.kinds.promote import GateSettings, gate_decision

from .conftest import run_cli, tiny_settings

pytestmark = pytest.mark.e2e

def recipe(folder, gate: dict | None = None, name="gated") -> str:
    stages = {
        "data": {"kind": "prepare_data", **tiny_settings("prepare_data")},
        "base": {"kind": "pretrain", **tiny_settings("pretrain")},
        "sft": {"kind": "sft", "inputs": {"data": "data", "base": "base"}, **tiny_settings("sft")},
        "dpo": {"kind": "dpo", "inputs": {"data": "data", "policy": "sft"}, **tiny_settings("align")},
        "evaluate": {"kind": "evaluate", **tiny_settings("evaluate"), "inputs": {"data": "data", "sft": "sft", "policy": "dpo"}},
        "promote": {"kind": "promote", "inputs": {"policy": "dpo", "report": "evaluate", "data": "data"},
                    **({"gate": gate} if gate else {})},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "seed": 0, "stages": stages}, sort_keys=False))
    return str(path)


def by_name(summary):
    return {s["name"]: s for s in summary["stages"]}


def test_the_gate_says_why():
    metrics = {"policy/task_accuracy": 0.62, "sft/task_accuracy": 0.60, "policy/task_accuracy_delta_vs_sft": 0.02,
               "policy/task_accuracy_delta_vs_sft_ci_low": -0.03, "policy/task_accuracy_delta_vs_sft_ci_high": 0.07,
               "policy/kl_to_sft": 0.5}
    passed, reasons = gate_decision(metrics, GateSettings(), "policy", None)
    assert not passed and "interval [-0.030, +0.070] not clear of +0.000" in reasons[0]
    metrics["policy/task_accuracy_delta_vs_sft_ci_low"] = 0.01
    passed, reasons = gate_decision(metrics, GateSettings(), "policy", None)
    assert passed and reasons[-1] == "no champion yet"
    passed, reasons = gate_decision(metrics, GateSettings(), "policy", {"version": "3", "value": 0.7})
    assert not passed and "< champion version 3's 0.700" in reasons[-1]
    passed, _ = gate_decision({**metrics, "policy/kl_to_sft": 5.0}, GateSettings(), "policy", None)
    assert not passed
    passed, reasons = gate_decision(metrics, GateSettings(), "dpo", None)
    assert not passed and "no dpo/task_accuracy" in reasons[0]


@pytest.fixture(scope="module")
def gated(state_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipes")
    code, summary = run_cli(state_home, config=recipe(folder))  # the default gate: the tiny policy cannot pass
    assert code == 0, summary
    return folder, summary


def test_every_trained_model_is_a_registered_version_linked_to_its_run(gated):
    _, summary = gated
    client = MlflowClient(summary["tracking_uri"])
    stages = by_name(summary)
    for name, registered in (("base", "gated-base"), ("sft", "gated-sft"), ("dpo", "gated-dpo")):
        uri = stages[name]["registered_model"]
        assert uri.startswith(f"models:/{registered}/"), uri
        version = client.get_model_version(registered, uri.rsplit("/", 1)[1])
        assert version.run_id == stages[name]["mlflow_run_id"]
        assert version.tags["posttrain.cache_key"] == stages[name]["cache_key"]
        assert version.tags["posttrain.output_digest"] == stages[name]["output_digest"]
        assert version.tags["posttrain.pipeline_run_id"] == summary["mlflow_run_id"]


def test_a_policy_that_fails_the_gate_is_the_challenger_with_the_reasons(gated):
    _, summary = gated
    client = MlflowClient(summary["tracking_uri"])
    promote = by_name(summary)["promote"]
    assert promote["metrics"]["promote/champion"] == 0.0
    challenger = client.get_model_version_by_alias("gated-policy", "challenger")
    assert "not clear of" in challenger.tags["posttrain.gate.reasons"] and challenger.tags["posttrain.gate"] == "failed"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("gated-policy", "champion")
    # the decision is the first thing on the pipeline's MLflow run (its description)
    note = client.get_run(summary["mlflow_run_id"]).data.tags["mlflow.note.content"]
    assert note.startswith(f"**Promotion** (promote): models:/gated-policy/{challenger.version} is **@challenger**: ")
    assert "not clear of" in note.splitlines()[0]


def test_a_passing_gate_makes_the_champion_which_loads_and_feeds_another_recipe(gated, state_home, tmp_path):
    from transformers import AutoModelForCausalLM

    from flows.cli import main
    from tasks.machinery.modeling import materialize_external, resolve_model

    folder, first = gated
    lenient = {"min_improvement": -1.0, "max_kl": None, "beat_champion": True}
    code, summary = run_cli(state_home, config=recipe(folder, lenient))
    assert code == 0, summary
    client = MlflowClient(summary["tracking_uri"])
    assert by_name(summary)["promote"]["metrics"]["promote/champion"] == 1.0
    champion = client.get_model_version_by_alias("gated-policy", "champion")
    assert "no champion yet" in champion.tags["posttrain.gate.reasons"]
    ref = resolve_model("models:/gated-policy@champion", summary["tracking_uri"])
    assert ref["uri"] == f"models:/gated-policy/{champion.version}"
    path = materialize_external(ref, summary["tracking_uri"])
    assert AutoModelForCausalLM.from_pretrained(path).num_parameters() > 0
    # the champion as the starting policy of another recipe
    other = yaml.safe_load(open(recipe(folder, name="followup")))
    other["stages"]["dpo"]["inputs"]["policy"] = "models:/gated-policy@champion"
    # ... and evaluated beside the new policy, every pair judged by a rule (the demo's arithmetic checker)
    other["stages"]["evaluate"]["inputs"]["champion"] = "models:/gated-policy@champion"
    other["stages"]["evaluate"]["judge"] = {"backend": "rule", "function": "tasks.machinery.synthetic:arithmetic_reward"}
    del other["stages"]["promote"]
    path = tmp_path / "followup.yaml"
    path.write_text(yaml.safe_dump(other, sort_keys=False))
    code, follow = run_cli(state_home, config=str(path))
    assert code == 0, follow
    tags = client.get_run(by_name(follow)["dpo"]["mlflow_run_id"]).data.tags
    assert tags["posttrain.input.policy"].startswith(f"models:/gated-policy/{champion.version}@")
    evaluation = by_name(follow)["evaluate"]["metrics"]
    for model in ("sft", "policy", "champion"):
        assert 0.0 <= evaluation[f"{model}/judge_score"] <= 1.0  # the rule scores every model's replies
        assert evaluation[f"{model}/judge_score"] == pytest.approx(evaluation[f"{model}/task_accuracy"])
    matrix = json.loads(open(client.download_artifacts(by_name(follow)["evaluate"]["mlflow_run_id"],
                                                       "evaluation/win_rates.json")).read())
    assert matrix["models"] == ["sft", "policy", "champion"] and matrix["judge"] == "arithmetic_reward"
    assert "eval/champion/task_accuracy" in follow["metrics"]
    # by hand: the first run's (challenger) model becomes the champion
    assert main(["promote", first["mlflow_run_id"]]) == 0
    assert client.get_model_version_by_alias("gated-policy", "champion").version == \
        client.get_model_version_by_alias("gated-policy", "challenger").version
    assert main(["promote", first["mlflow_run_id"], "--stage", "nope"]) == 3


def test_a_reproduction_replays_the_promotion_decision_and_leaves_the_registry_alone(gated, state_home):
    """The original run promoted its policy with no champion in the registry; when it is reproduced, that
    policy is the champion. The reproduction decides again against the champion the original saw, agrees
    (exit 0, equal decision and digests), registers no version and moves no alias."""
    from flows.cli import main

    folder, _ = gated
    code, original = run_cli(state_home, config=recipe(folder, {"min_improvement": -1.0, "max_kl": None},
                                                       name="replayed"))
    assert code == 0 and by_name(original)["promote"]["metrics"]["promote/champion"] == 1.0
    client = MlflowClient(original["tracking_uri"])

    def registry():
        return {m.name: (sorted(v.version for v in client.search_model_versions(f"name = '{m.name}'")),
                         dict(sorted(m.aliases.items())))
                for m in client.search_registered_models() if m.name.startswith("replayed-")}

    before = registry()
    version = int(by_name(original)["promote"]["metrics"]["promote/version"])
    assert {alias: int(v) for alias, v in before["replayed-policy"][1].items()} == {"champion": version}
    out = state_home / "reproduction.json"
    assert main(["reproduce", original["mlflow_run_id"], "--summary-json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert registry() == before, "a reproduction registers nothing and moves no alias"
    promote = by_name(again)["promote"]
    for name in ("promote/champion", "promote/version"):
        assert promote["metrics"][name] == by_name(original)["promote"]["metrics"][name]
    assert promote["output_digest"] == by_name(original)["promote"]["output_digest"], "the same decision.json"
    assert "registered_model" not in by_name(again)["dpo"]
    tags = client.get_run(promote["mlflow_run_id"]).data.tags
    assert tags["posttrain.promote.replayed_from"] == original["mlflow_run_id"]
