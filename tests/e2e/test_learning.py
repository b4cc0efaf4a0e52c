"""The demo recipe learns for real: thresholds on held-out prompts, never exact figures.

CI runs seed 0; `POSTTRAIN_LEARNING_SEEDS="0 1 2" python -m pytest -m learning` runs each seed (about 4
minutes a seed on 2 cores). bench/learning.py prints the table per seed with mean and min.
"""

import os

import pytest

from .conftest import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.learning]
SEEDS = [int(s) for s in os.environ.get("POSTTRAIN_LEARNING_SEEDS", "0").replace(",", " ").split()]


@pytest.fixture(scope="module", params=SEEDS, ids=lambda seed: f"seed{seed}")
def demo(request, state_home):
    """The demo with DPO, then with RLHF in the same state folder (upstream stages from cache)."""
    seed = request.param
    code, dpo = run_cli(state_home, f"seed={seed}", config="configs/demo.yaml")
    assert code == 0
    code, rlhf = run_cli(state_home, f"seed={seed}", config="configs/demo-rlhf.yaml")
    assert code == 0
    statuses = {s["name"]: s["status"] for s in rlhf["stages"]}
    assert statuses["sft"] == statuses["reward"] == "cached"
    return dpo["metrics"], rlhf["metrics"]


def test_sft_beats_base_by_a_wide_margin(demo):
    dpo, _ = demo
    assert dpo["eval/sft/task_accuracy"] >= dpo["eval/base/task_accuracy"] + 0.3


def test_reward_model_ranks_held_out_pairs(demo):
    dpo, _ = demo
    assert dpo["reward/pairwise_accuracy"] >= 0.9


def test_dpo_policy_beats_sft(demo):
    dpo, _ = demo
    assert dpo["eval/policy/task_accuracy"] >= dpo["eval/sft/task_accuracy"] + 0.05


def test_rlhf_policy_beats_sft(demo):
    _, rlhf = demo
    assert rlhf["eval/policy/task_accuracy"] >= rlhf["eval/sft/task_accuracy"] + 0.05


def test_the_dpo_policy_passes_the_gate_and_becomes_the_champion(demo):
    """The demo's promote stage: DPO beats SFT with the paired interval clear of zero and a small KL, so it is
    registered as models:/demo-policy@champion; the RLHF run after it is judged against that champion."""
    dpo, rlhf = demo
    assert dpo["promote/promote/champion"] == 1.0
    assert dpo["eval/policy/task_accuracy_delta_vs_sft_ci_low"] > 0
    assert rlhf["promote/promote/champion"] in (0.0, 1.0)
    assert rlhf["promote/promote/version"] == dpo["promote/promote/version"] + 1  # a new version of demo-policy
