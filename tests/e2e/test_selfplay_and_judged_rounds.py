"""SPIN and RLAIF (online DPO) rounds by their plain functions: the pairs each round makes, and that it trains."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tasks.kinds import online_dpo, spin
from tasks.machinery.context import StageContext
from tests.servers import OpenAIServer

TRAINING = {"learning_rate": 5e-4, "max_steps": 3, "batch_size": 8, "max_length": 128, "logging_steps": 1}


def changed(before, after) -> bool:
    a = AutoModelForCausalLM.from_pretrained(before).state_dict()
    b = AutoModelForCausalLM.from_pretrained(after).state_dict()
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_a_spin_round_trains_demonstrations_against_the_models_own_replies(prepared, tmp_path):
    from tasks.machinery.splits import load_split
    from tasks.machinery.modeling import load_causal_lm, load_tokenizer

    _, root = prepared
    cfg = spin.SPINStageConfig(max_completion_length=8, prompts_per_round=48, loss_type=["sigmoid"], training=TRAINING)
    train = load_split(root / "data", "sft", "train")
    model, tokenizer = load_causal_lm(root / "base"), load_tokenizer(root / "base")
    pairs, counts, records = spin.self_play_pairs(cfg, train, model, tokenizer, seed=0, round_=2)
    assert len(records) == 48 and sum(r["kept"] for r in records) == len(pairs)
    demonstrations = {json.dumps(r["prompt"]): r["completion"] for r in train}
    assert len(pairs) == counts["spin/pairs"] > 0 and counts["spin/prompts"] == 48
    for row in pairs:
        assert row["chosen"] == demonstrations[json.dumps(row["prompt"])], "chosen is the human demonstration"
        assert row["rejected"][0]["content"] != row["chosen"][0]["content"]
    again, _, _ = spin.self_play_pairs(cfg, train, model, tokenizer, seed=0, round_=2)
    other, _, _ = spin.self_play_pairs(cfg, train, model, tokenizer, seed=0, round_=3)
    assert again["prompt"] == pairs["prompt"] and other["prompt"] != pairs["prompt"], "seeded per round"
    ctx = StageContext(seed=0, env=None, run_id=None, stage="spin.round1")
    metrics = spin._train(cfg, {"data": root / "data", "policy": root / "base"}, tmp_path / "policy", ctx)
    assert metrics["train/steps"] == 3 and metrics["spin/pairs"] > 0
    assert changed(root / "base", tmp_path / "policy")


def test_an_online_dpo_round_trains_on_pairs_an_endpoint_judged(prepared, tmp_path):
    _, root = prepared
    server = OpenAIServer(tmp_path, "--rule", "shorter")
    try:
        registry = f"sqlite:///{tmp_path}/mlflow.db"
        cfg = online_dpo.OnlineDPOStageConfig(
            judge={"backend": "endpoint", "url": server.url, "model": "shorter-wins", "retry_backoff_seconds": 0.01},
            judge_mode="compare", max_completion_length=8, prompts_per_round=32, loss_type=["sigmoid"],
            training=TRAINING)
        inputs = {"data": root / "data", "policy": root / "base", **online_dpo.judge_sources(cfg, registry)}
        assert set(inputs) == {"data", "policy", "judge.prompt.compare"}
        from tasks.machinery.context import RunEnv

        env = RunEnv(storage_root=str(tmp_path / "store"), tracking_uri=registry, experiment_id="0", parent_run_id="")
        ctx = StageContext(seed=0, env=env, run_id=None, stage="online_dpo.round1")
        metrics = online_dpo._train(cfg, inputs, tmp_path / "policy", ctx)
        asked = server.stats()
    finally:
        server.stop()
    assert asked["requests"] == 2 * 32, "each pair asked in both orders"
    records = [json.loads(line) for line in (tmp_path / "policy" / "pairs.jsonl").read_text().splitlines()]
    assert len(records) == 32 and metrics["judge/pairs"] == sum(r["kept"] for r in records) > 0
    for r in records:
        a, b = (len(x.strip()) for x in r["replies"])
        assert r["preference_first"] == (1.0 if a < b else 0.0 if b < a else 0.5), "the judge's verdict, both orders"
    assert metrics["train/steps"] == 3 and changed(root / "base", tmp_path / "policy")


def test_online_dpo_settings_are_checked():
    from flows.config import ConfigError, validate_recipe

    data = {"kind": "prepare_data", "sft": {"source": "a.jsonl"}, "preference": {"source": "b.jsonl"}}
    stage = {"kind": "online_dpo", "inputs": {"data": "data", "policy": "org/model"}}
    with pytest.raises(ConfigError, match="reads the `reward` input"):
        validate_recipe({"name": "t", "stages": {"data": data, "o": stage}})
    with pytest.raises(ConfigError, match="set samples_per_prompt: 2"):
        validate_recipe({"name": "t", "stages": {"data": data, "o": {
            **stage, "judge": {"backend": "rule", "function": "tasks.machinery.synthetic:arithmetic_reward"},
            "judge_mode": "compare", "samples_per_prompt": 4}}})
