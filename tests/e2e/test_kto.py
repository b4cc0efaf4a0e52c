"""KTO on unpaired feedback at the tiny size: the rows reach the trainer shuffled (both labels in nearly every
batch), the policy's weights move, and preference pairs can be unpaired by the stage itself."""

import pytest

from tasks.kinds.prepare_data import DataConfig, DatasetSource, prepare_data
from tasks.machinery.splits import load_split
from tasks.kinds.kto import KTOStageConfig, _train, unpaired_rows
from tasks.machinery.context import StageContext


@pytest.fixture(scope="module")
def feedback(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("kto-data")
    prepare_data(DataConfig(unpaired=DatasetSource(source="synthetic:arithmetic/unpaired"),
                            preference=DatasetSource(source="synthetic:arithmetic/preference")), out, seed=0)
    return out


def _mixed_batches(labels, size=8) -> float:
    batches = [labels[i:i + size] for i in range(0, len(labels) - size + 1, size)]
    return sum(0 < sum(b) < len(b) for b in batches) / len(batches)


def test_rows_reach_the_trainer_shuffled_with_both_labels_in_nearly_every_batch(feedback):
    unpaired = unpaired_rows(load_split(feedback, "unpaired", "train"), "unpaired", seed=0)
    assert _mixed_batches(unpaired["label"]) > 0.9
    pairs = load_split(feedback, "preference", "train")
    unpaired_pairs = unpaired_rows(pairs, "preference", seed=0)
    labels = unpaired_pairs["label"]
    assert len(labels) == 2 * len(pairs) and sum(labels) == len(pairs)
    assert _mixed_batches(labels) > 0.9, "not all chosen rows first, then all rejected ones"
    assert unpaired_rows(pairs, "preference", seed=0)["completion"] == unpaired_pairs["completion"], "seeded"


def test_kto_trains_the_policy(prepared, feedback, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    _, root = prepared
    cfg = KTOStageConfig(training={"learning_rate": 5e-4, "max_steps": 6, "batch_size": 8, "max_length": 128,
                                   "logging_steps": 1}, desirable_weight=1.0, undesirable_weight=1.2)
    ctx = StageContext(seed=0, env=None, run_id=None, stage="kto")
    metrics = _train(cfg, {"data": feedback, "policy": root / "base"}, tmp_path / "policy", ctx)
    assert metrics["train/steps"] == 6 and metrics["data/desirable_rows"] > 0 and metrics["data/undesirable_rows"] > 0
    before = AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_batch_of_one_is_refused():
    with pytest.raises(ValueError, match="training.batch_size must be at least 2"):
        KTOStageConfig(training={"batch_size": 1})


def test_a_recipe_whose_data_stage_lacks_the_kind_kto_reads_is_refused():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="kto reads preference data, but 'data' prepares none"):
        load_config("configs/kto.yaml", ["kto.data_kind=preference"])
