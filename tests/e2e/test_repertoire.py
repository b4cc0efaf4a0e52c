"""The repertoire through the flow at the tiny size: LoRA on every training stage stored as adapters and merged
only for the consumer, RLOO, SPIN and RLAIF rounds (an OpenAI-compatible endpoint as judge, its prompt versioned
in the MLflow prompt registry and in the cache key), all evaluated side by side in one run; and prompt tuning."""

import json
from pathlib import Path

import pytest
import yaml

from tests.servers import OpenAIServer

from .conftest import run_cli, tiny_settings

pytestmark = pytest.mark.e2e

LORA = {"enabled": True, "r": 4, "alpha": 8}
STEPS = {"max_steps": 4, "batch_size": 8, "logging_steps": 2, "max_length": 128, "learning_rate": 5e-4}
ROLLOUTS = {"num_generations": 4, "max_completion_length": 4}


def repertoire_recipe(folder: Path, judge_url: str, judge_prompt: str | None = None) -> str:
    lora = {**STEPS, "lora": LORA}
    judge = {"backend": "endpoint", "url": judge_url, "model": "shorter-wins", "retry_backoff_seconds": 0.01}
    if judge_prompt:
        judge["prompt"] = judge_prompt
    stages = {
        "data": {"kind": "prepare_data", **tiny_settings("prepare_data")},
        "base": {"kind": "pretrain", **tiny_settings("pretrain")},
        "sft": {"kind": "sft", "inputs": {"data": "data", "base": "base"},
                "training": {**tiny_settings("sft")["training"], "lora": {**LORA, "variant": "dora"}}},
        "reward": {"kind": "reward", "inputs": {"data": "data", "init": "sft"},
                   "training": {**tiny_settings("reward")["training"], "lora": LORA}},
        "dpo": {"kind": "dpo", "inputs": {"data": "data", "policy": "sft"}, "loss_type": ["sigmoid"], "training": lora},
        "kto": {"kind": "kto", "inputs": {"data": "data", "policy": "sft"}, "data_kind": "preference",
                "training": lora},
        "rlhf": {"kind": "rlhf", "inputs": {"data": "data", "policy": "sft", "reward": "reward"}, **ROLLOUTS,
                 "judges": [{**{k: v for k, v in judge.items() if k != "prompt"}, "weight": 0.5}], "training": lora},
        "rloo": {"kind": "rloo", "inputs": {"data": "data", "policy": "sft", "reward": "reward"}, **ROLLOUTS,
                 "verifiers": [{"function": "tasks.machinery.synthetic:arithmetic_reward", "weight": 0.5}], "training": lora},
        "rlaif": {"kind": "online_dpo", "rounds": 2, "inputs": {"data": "data", "policy": "sft"}, "judge": judge,
                  "judge_mode": "compare", "max_completion_length": 4, "prompts_per_round": 24,
                  "loss_type": ["sigmoid"], "training": lora},
        "spin": {"kind": "spin", "rounds": 2, "inputs": {"data": "data", "policy": "sft"}, "max_completion_length": 4,
                 "prompts_per_round": 24, "loss_type": ["sigmoid"], "training": lora},
        "evaluate": {"kind": "evaluate", **tiny_settings("evaluate"),
                     "inputs": {"data": "data", "reward": "reward", "sft": "sft", "dpo": "dpo", "kto": "kto",
                                "rlhf": "rlhf", "rloo": "rloo", "rlaif": "rlaif", "spin": "spin"}},
    }
    path = folder / "repertoire.yaml"
    path.write_text(yaml.safe_dump({"name": "repertoire", "seed": 0, "stages": stages}, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    server = OpenAIServer(tmp_path_factory.mktemp("judge"), "--rule", "shorter")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def repertoire(state_home, judge_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipes")
    code, summary = run_cli(state_home, config=repertoire_recipe(folder, judge_server.url))
    assert code == 0, summary
    return folder, summary


def by_name(summary):
    return {s["name"]: s for s in summary["stages"]}


def output(stage: dict) -> dict:
    return {"uri": stage["output_uri"], "digest": stage["output_digest"]}


def store_of(stage: dict):
    from tasks.machinery.store import ArtifactStore

    return ArtifactStore(stage["output_uri"].rsplit("/", 2)[0])


def stored(stage: dict) -> Path:
    from tasks.machinery.store import Ref

    return store_of(stage).materialize(Ref.from_dict(output(stage)))


def test_every_method_is_evaluated_side_by_side_under_its_instance_name(repertoire):
    _, summary = repertoire
    for name in ("sft", "dpo", "kto", "rlhf", "rloo", "rlaif", "spin"):
        assert 0.0 <= summary["metrics"][f"eval/{name}/task_accuracy"] <= 1.0, name
    stages = by_name(summary)
    assert {"rlaif.round1", "rlaif.round2", "spin.round1", "spin.round2"} <= set(stages)
    assert stages["rlaif.round2"]["metrics"]["judge/pairs"] > 0 and stages["spin.round1"]["metrics"]["spin/pairs"] > 0


def test_a_judge_scores_grpo_rollouts_through_the_endpoint(repertoire, judge_server):
    _, summary = repertoire
    asked = judge_server.stats()["prompts"]
    scored = [p for p in asked if "Rate how correct and helpful" in p]
    assert scored, "GRPO's rollouts were scored by the endpoint judge"
    assert len(set(scored)) == len(scored), "a (question, reply) already judged comes from the verdict cache"
    rlhf = by_name(summary)["rlhf"]
    assert "train/final_reward" in rlhf["metrics"]


def test_lora_stages_store_adapters_that_name_their_base(repertoire):
    _, summary = repertoire
    stages = by_name(summary)
    for name in ("sft", "reward", "dpo", "kto", "rlhf", "rloo", "rlaif.round1", "rlaif.round2", "spin.round1",
                 "spin.round2"):
        folder = stored(stages[name])
        assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists(), name
        metrics = stages[name]["metrics"]
        assert 0 < metrics["model/adapter_mb"] < metrics["model/full_mb"], name
    assert json.loads((stored(stages["sft"]) / "adapter_config.json").read_text())["use_dora"] is True
    # Each round adapts the previous round (merged), so its reference is the previous round, not the base.
    base_of = lambda name: json.loads((stored(stages[name]) / "adapter_base.json").read_text())  # noqa: E731
    assert base_of("spin.round2")["uri"] == stages["spin.round1"]["output_uri"]
    assert base_of("spin.round1")["uri"] == stages["sft"]["output_uri"]
    assert base_of("reward")["uri"] == stages["sft"]["output_uri"]


def test_an_adapter_is_merged_for_its_consumer_and_cached(repertoire):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.machinery.context import materialize_input

    _, summary = repertoire
    stages = by_name(summary)
    store = store_of(stages["spin.round2"])
    merged = materialize_input(store, output(stages["spin.round2"]))
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    assert materialize_input(store, output(stages["spin.round2"])) == merged, "merged once, then cached"
    round1 = materialize_input(store, output(stages["spin.round1"]))
    a = AutoModelForCausalLM.from_pretrained(round1).state_dict()
    b = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a), "round 2 trained on top of round 1"


def test_editing_the_judge_prompt_is_a_new_registry_version_and_reruns_only_the_judged_rounds(repertoire, state_home,
                                                                                                judge_server):
    from mlflow import MlflowClient

    folder, first = repertoire
    prompt = ("Which reply is better? Answer A or B.\n\nQuestion: {{question}}\n\nReply A: {{answer_a}}\n\n"
              "Reply B: {{answer_b}}")
    code, summary = run_cli(state_home, config=repertoire_recipe(folder, judge_server.url, prompt))
    assert code == 0, summary
    stages = by_name(summary)
    rerun = {name for name, s in stages.items() if s["status"] != "cached"}
    assert rerun == {"rlaif.round1", "rlaif.round2", "evaluate"}, rerun
    versions = MlflowClient(summary["tracking_uri"]).search_prompt_versions("posttrain-judge-endpoint-compare")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert by_name(first)["rlaif.round1"]["cache_key"] != stages["rlaif.round1"]["cache_key"]


def test_prompt_tuning_trains_a_soft_prompt_that_evaluation_loads(prepared, tmp_path):
    from tasks.kinds.evaluate import EvaluateConfig, evaluate
    from tasks.machinery.modeling import load_causal_lm, materialize_adapter
    from tasks.kinds.sft import SFTStageConfig, train_sft

    cfg_, root = prepared
    cfg = SFTStageConfig(training=STEPS, prompt_tuning={"enabled": True, "num_virtual_tokens": 8,
                                                        "init_text": "What is the sum"})
    metrics = train_sft(cfg, root / "data", root / "base", tmp_path / "sft", seed=0)
    config = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 8
    assert metrics["model/trainable_parameters"] == 8 * 32 and metrics["model/adapter_mb"] < metrics["model/full_mb"]
    (tmp_path / "report").mkdir()
    soft = materialize_adapter(tmp_path / "sft", "prompt-tuned-test", lambda ref: Path(ref["uri"]))
    report = evaluate(EvaluateConfig(max_new_tokens=4, max_prompts=8, kl_samples=1),
                      root / "data", {"sft": soft, "base": root / "base"}, None, tmp_path / "report", seed=0)
    assert "sft/task_accuracy" in report and "sft/kl_to_sft" not in report
    with pytest.raises(ValueError, match="can be evaluated or used as a judge, not trained further"):
        load_causal_lm(soft, for_training=True)
    with pytest.raises(ValueError, match="choose one of training.lora and prompt_tuning"):
        SFTStageConfig(training={"lora": LORA}, prompt_tuning={"enabled": True})
