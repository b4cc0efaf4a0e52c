"""Bootstrap confidence intervals of the evaluation's headline numbers."""

import random

import pytest

from tasks.blocks.scoring import bootstrap_intervals


def test_intervals_are_seeded_contain_the_mean_and_narrow_with_more_prompts():
    rng = random.Random(0)
    small = [float(rng.random() < 0.6) for _ in range(150)]
    large = [float(rng.random() < 0.6) for _ in range(1500)]
    a = bootstrap_intervals({"m/task_accuracy": small}, 1000, 0.95, seed=0)["m/task_accuracy"]
    assert a == bootstrap_intervals({"m/task_accuracy": small}, 1000, 0.95, seed=0)["m/task_accuracy"]
    assert a != bootstrap_intervals({"m/task_accuracy": small}, 1000, 0.95, seed=1)["m/task_accuracy"]
    mean = sum(small) / len(small)
    assert a[0] < mean < a[1]
    assert 0.1 < a[1] - a[0] < 0.2, "about ±0.08 for 150 prompts at p = 0.6"
    b = bootstrap_intervals({"m": large}, 1000, 0.95, seed=0)["m"]
    assert b[1] - b[0] < (a[1] - a[0]) / 2


def test_a_small_difference_on_150_prompts_is_within_noise_and_pairing_narrows_it():
    rng = random.Random(1)
    sft = [float(rng.random() < 0.6) for _ in range(150)]
    policy = [1.0 if (s or rng.random() < 0.05) else 0.0 for s in sft]  # right where SFT is, a few more
    delta = [p - s for p, s in zip(policy, sft)]
    ci = bootstrap_intervals({"policy": policy, "delta": delta, "same": [0.0] * 150}, 2000, 0.95, seed=0)
    assert ci["delta"][0] >= 0.0, "paired: the policy never loses a prompt SFT gets, so the interval stays >= 0"
    assert ci["same"] == (0.0, 0.0)
    noisy = [p - s for p, s in zip([float(rng.random() < 0.62) for _ in range(150)], sft)]
    low, high = bootstrap_intervals({"d": noisy}, 2000, 0.95, seed=0)["d"]
    assert low < 0 < high, "an unpaired +0.02 on 150 prompts is within noise"
    assert bootstrap_intervals({"x": sft}, 0, 0.95, seed=0) == {}
    with pytest.raises(ValueError, match="different lengths"):
        bootstrap_intervals({"a": [1.0], "b": [1.0, 0.0]}, 10, 0.95, seed=0)
