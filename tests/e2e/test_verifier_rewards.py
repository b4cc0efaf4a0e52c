"""GRPO and RLOO against a rule instead of (or beside) a reward model: the demo's arithmetic checker as a
verifier."""

import pytest

from flows.config import ConfigError, validate_recipe
from tasks.kinds import rlhf, rloo
from tasks.blocks.online_rl import reward_sources
from tasks.machinery.context import StageContext
from tasks.machinery.synthetic import arithmetic_reward

VERIFIER = {"function": "tasks.machinery.synthetic:arithmetic_reward", "weight": 1.0}


def test_the_arithmetic_verifier_checks_the_sum():
    prompts = [[{"role": "user", "content": "What is 3 plus 4?"}], [{"role": "user", "content": "Add 9 and 8."}],
               [{"role": "user", "content": "Compute 2 + 2."}]]
    completions = [[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": "16"}],
                   [{"role": "assistant", "content": "I don't know."}]]
    assert arithmetic_reward(prompts, completions) == [1.0, 0.0, 0.0]


def test_an_rlhf_stage_needs_a_reward_model_or_a_verifier(tmp_path):
    data = {"kind": "prepare_data", "sft": {"source": "a.jsonl"}, "preference": {"source": "b.jsonl"}}
    rl = {"kind": "rlhf", "inputs": {"data": "data", "policy": "org/model"}, "num_generations": 4}
    with pytest.raises(ConfigError, match="no reward: give a `reward` input"):
        validate_recipe({"name": "t", "stages": {"data": data, "rl": rl}})
    with pytest.raises(ConfigError, match="no reward: give a `reward` input"):
        validate_recipe({"name": "t", "stages": {"data": data, "rl": {**rl, "kind": "rloo"}}})
    cfg = validate_recipe({"name": "t", "stages": {"data": data, "rl": {**rl, "verifiers": [VERIFIER]}}})
    assert cfg.stages["rl"].verifiers[0].weight == 1.0
    with pytest.raises(ConfigError, match="expected module:function"):
        validate_recipe({"name": "t", "stages": {"data": data, "rl": {**rl, "verifiers": [{"function": "nope"}]}}})
    refs = reward_sources(cfg.stages["rl"])
    assert refs["verifier.0"]["uri"] == VERIFIER["function"] and len(refs["verifier.0"]["digest"]) == 64


CALLS = []


def short_reply_reward(prompts, completions, **kwargs):
    """A rule the untrained tiny model's samples differ on (the arithmetic checker gives it 0 everywhere)."""
    CALLS.append(len(completions))
    return [1.0 if len(c[-1]["content"]) < 6 else 0.0 for c in completions]


@pytest.mark.parametrize("method", [rlhf, rloo], ids=["grpo", "rloo"])
def test_online_rl_with_verifiers_alone_trains_the_policy(method, prepared, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    _, root = prepared
    rules = [VERIFIER, {"function": f"{__name__}:short_reply_reward", "weight": 0.5}]
    CALLS.clear()
    cfg = method.KIND.config(num_generations=4, max_completion_length=8, temperature=1.0, verifiers=rules,
                          training={"learning_rate": 2e-4, "max_steps": 4, "batch_size": 8, "max_length": 128,
                                    "logging_steps": 1})
    ctx = StageContext(seed=0, env=None, run_id=None, stage="rlhf")
    metrics = method._train(cfg, {"data": root / "data", "policy": root / "base"}, tmp_path / "policy", ctx)
    assert metrics["train/steps"] == 4 and "train/final_reward" in metrics
    assert sum(CALLS) == 4 * 8, "every sampled completion was scored by the rule"
    before = AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
