"""Feedback elicitation's parts: the selection rules, the anchored reward ensemble, the simulated rater."""

import random
from itertools import combinations

import pytest
import torch

from tasks.blocks.elicitation import RULES, Ensemble, EnsembleSettings, RaterSettings, SimulatedRater, select_pair

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_picks_two_different_candidates_and_is_seeded(rule):
    rewards = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    picks = [select_pair(rule, rewards, random.Random(seed)) for seed in range(20)]
    assert all(i != j and 0 <= i < 5 and 0 <= j < 5 for i, j in picks)
    assert picks == [select_pair(rule, rewards, random.Random(seed)) for seed in range(20)]


def test_passive_shows_every_pair_boltzmann_favours_the_best():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 9.0, 8.0]] * 10)
    rng = random.Random(0)
    seen = {frozenset(select_pair("passive", rewards, rng)) for _ in range(400)}
    assert seen == {frozenset(p) for p in combinations(range(5), 2)}
    top = [frozenset(select_pair("boltzmann", rewards, rng)) for _ in range(200)]
    assert top.count(frozenset({3, 4})) > 190


def test_infomax_asks_where_the_heads_disagree():
    rewards = torch.zeros(10, 4)
    rewards[:, 0], rewards[:, 1] = 5.0, -5.0  # every head: 0 beats 1 by far
    rewards[:, 2] = torch.linspace(-3, 3, 10)  # the heads disagree about 2 against 3
    assert frozenset(select_pair("infomax", rewards, random.Random(0))) == {2, 3}


def test_double_ts_takes_a_sampled_heads_best_and_falls_back_to_the_second_best():
    agree = torch.tensor([[1.0, 5.0, 3.0, 0.0]] * 10)  # every head's best is 1: the second reply is head's 2nd best
    assert select_pair("double_ts", agree, random.Random(0)) == (1, 2)
    split = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 5 + [[0.0, 0.0, 0.0, 5.0]] * 5)
    picks = {select_pair("double_ts", split, random.Random(seed)) for seed in range(30)}
    assert picks == {(0, 3), (3, 0)}, "the two replies two different heads think best"


def test_heads_learn_what_the_labels_say_and_keep_their_own_prior_elsewhere():
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g)
    first[:, 3] = second[:, 3] = 0.0  # the labels never vary feature 3
    labels = (first[:, 0] > second[:, 0]).float().tolist()
    for hidden in (0, 16):
        ensemble = Ensemble(EnsembleSettings(heads=10, hidden=hidden, prior_weight=0.1), dim=4, seed=0)
        ensemble.fit(first, second, labels)
        a, b = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
        a[:, 3] = b[:, 3] = 0.0
        each = (ensemble.rewards(a) > ensemble.rewards(b)) == (a[:, 0] > b[:, 0])
        assert each.float().mean(1).min() > 0.9, "every head ranks held-out pairs by feature 0"
        probe = torch.zeros(2, 4)
        probe[0, 3], probe[1, 3] = 2.0, -2.0  # a pair that differs only where no label has spoken
        seen = torch.zeros(2, 4)
        seen[0, 0], seen[1, 0] = 2.0, -2.0
        unlabelled = ensemble.rewards(probe)
        labelled = ensemble.rewards(seen)
        assert ((unlabelled[:, 0] > unlabelled[:, 1]).float().mean()) not in (0.0, 1.0), "the heads disagree there"
        assert bool((labelled[:, 0] > labelled[:, 1]).all()), "and agree where the labels decide"
    fits = []
    for _ in range(2):
        ensemble = Ensemble(EnsembleSettings(heads=10, hidden=0, prior_weight=0.1), dim=4, seed=0)
        ensemble.fit(first, second, labels)
        fits.append(ensemble.params["w1"])
    assert torch.equal(*fits), "seeded"


def test_the_simulated_rater_knows_the_truth_and_slips_at_its_noise_rate():
    prompts = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a in range(10) for b in range(10)] * 20
    right = [str(sum(int(w) for w in p[0]["content"].replace("?", "").split() if w.isdigit())) for p in prompts]
    wrong = [str(int(r) + 1) for r in right]
    exact = SimulatedRater(RaterSettings(label_noise=0.0), seed=0)
    assert exact.label(prompts, right, wrong) == [1.0] * len(prompts)
    assert exact.label(prompts[:5], wrong[:5], right[:5]) == [0.0] * 5
    assert exact.label(prompts[:5], wrong[:5], wrong[:5]) == [0.5] * 5, "equal scores are a tie"
    noisy = SimulatedRater(RaterSettings(label_noise=0.3), seed=0)
    flipped = noisy.label(prompts, right, wrong).count(0.0) / len(prompts)
    assert 0.26 < flipped < 0.34
    assert noisy.label(prompts[:50], wrong[:50], wrong[:50]) == [0.5] * 50, "a tie is never flipped"
    assert noisy.label(prompts[:50], right[:50], wrong[:50], noisy=False) == [1.0] * 50


@pytest.mark.parametrize("training", [{"processes": 2}, {"checkpoint_steps": 5}, {"launcher": "accelerate"}])
def test_the_nested_dpo_refuses_settings_it_cannot_honour(training):
    from tasks.kinds.elicit import ElicitConfig

    with pytest.raises(ValueError, match="dpo.training: the DPO inside elicit trains in the stage's process"):
        ElicitConfig.model_validate({"dpo": {"training": training}})
    assert ElicitConfig.model_validate({"dpo": {}}).dpo.training.processes == 1
