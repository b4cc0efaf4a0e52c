"""The demo recipe learns for real (issue: 'Learning is real'): thresholds on held-out prompts."""

import pytest

from .conftest import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.learning]


@pytest.fixture(scope="module")
def dpo(state_home):
    code, summary = run_cli(state_home, config="configs/demo.yaml")
    assert code == 0
    return summary["metrics"]


def test_sft_beats_base_by_a_wide_margin(dpo):
    assert dpo["sft/task_accuracy"] >= dpo["base/task_accuracy"] + 0.3


def test_reward_model_ranks_held_out_pairs(dpo):
    assert dpo["reward/pairwise_accuracy"] >= 0.9


def test_dpo_policy_beats_sft(dpo):
    assert dpo["policy/task_accuracy"] >= dpo["sft/task_accuracy"] + 0.05


def test_rlhf_policy_beats_sft(dpo, state_home):
    code, summary = run_cli(state_home, "align.method=rlhf", config="configs/demo.yaml")
    assert code == 0
    statuses = {s["name"]: s["status"] for s in summary["stages"]}
    assert statuses["sft"] == statuses["reward"] == "cached"
    m = summary["metrics"]
    assert m["policy/task_accuracy"] >= m["sft/task_accuracy"] + 0.05
