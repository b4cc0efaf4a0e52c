"""orchestration.engine ray: which stages go to Ray and with what resources, and the batch each worker takes
(the Ray tier, tests/ray/, runs them on a cluster)."""

from pathlib import Path

import pytest
import yaml

from flows.config import PipelineConfig
from tasks.machinery.ray_engine import per_worker_training
from tasks.machinery.training import TrainingSettings

TINY = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml").read_text())


def _recipe(orchestration):
    return PipelineConfig.model_validate({**TINY, "orchestration": orchestration})


def test_stages_go_to_ray_by_engine_or_by_name_with_their_own_resources():
    cfg = _recipe({"stage_engines": {"sft": "ray", "align": "ray"},
                   "ray": {"address": "ray://head:10001", "workers": 2, "cpus_per_worker": 4,
                           "stages": {"align": {"workers": 4, "max_failures": 0}}}})
    assert cfg.orchestration.ray_settings("reward") is None
    assert cfg.orchestration.ray_settings("sft")["workers"] == 2
    align = cfg.orchestration.ray_settings("align")
    assert align["workers"] == 4 and align["max_failures"] == 0 and "stages" not in align
    assert align["address"] == "ray://head:10001" and align["cpus_per_worker"] == 4, "what align does not set"
    everything = _recipe({"engine": "ray", "stage_engines": {"evaluate": "local"}})
    assert everything.orchestration.ray_settings("pretrain") and not everything.orchestration.ray_settings("evaluate")


@pytest.mark.parametrize("setting", ["stage_engines", "stages"])
def test_an_unknown_stage_name_is_refused_naming_the_setting(setting):
    orchestration = {"stage_engines": {"sft_x": "ray"}} if setting == "stage_engines" else \
        {"ray": {"stages": {"sft_x": {"workers": 2}}}}
    with pytest.raises(ValueError, match=rf"orchestration\.(ray\.)?{setting}: sft_x is no stage of this recipe"):
        _recipe(orchestration)


def test_workers_share_the_recipes_global_batch():
    t = TrainingSettings(batch_size=8, processes=2)
    assert (per_worker_training(t, 4).batch_size, per_worker_training(t, 4).processes) == (4, 4)
    assert per_worker_training(t, 1).batch_size == 16
    with pytest.raises(ValueError, match=r"global batch\) does not split evenly over orchestration.ray workers = 3"):
        per_worker_training(t, 3)
