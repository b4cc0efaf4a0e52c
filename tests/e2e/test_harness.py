"""lm-evaluation-harness tasks inside the evaluate stage: a custom local task (YAML + a data file beside it)
runs offline on the run's models; its metric names are ones MLflow accepts; the task folder is a stage input."""

import json
import os
import shutil

import pytest

from tasks.kinds.evaluate import EvaluateConfig, evaluate
from tasks.blocks.harness import HarnessSettings, harness_sources, metric_name
from tasks.machinery.tracking import sanitize_metric_name

from .conftest import ROOT

pytestmark = pytest.mark.e2e
TASKS = ROOT / "configs" / "harness" / "arithmetic"


def test_a_local_task_runs_offline_on_every_model(prepared, tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "the suite runs offline: a Hub download would fail here"
    cfg, root = prepared
    harness = HarnessSettings(tasks=["posttrain_sums_generate", "posttrain_sums_choice"], include_path=str(TASKS),
                              limit=12, batch_size=8)
    (tmp_path / "out").mkdir()
    metrics = evaluate(EvaluateConfig(max_new_tokens=4, max_prompts=4, kl_samples=0, figures=False, harness=harness),
                       root / "data", {"base": root / "base", "again": root / "base"}, None, tmp_path / "out", seed=0)
    for model in ("base", "again"):
        accuracy = metrics[f"{model}/harness/posttrain_sums_choice/acc"]
        exact = metrics[f"{model}/harness/posttrain_sums_generate/exact_match/first_number"]
        assert 0.0 <= accuracy <= 1.0 and 0.0 <= exact <= 1.0
        assert f"{model}/harness/posttrain_sums_choice/acc_stderr" in metrics
        report = json.loads((tmp_path / "out" / "harness" / f"{model}.json").read_text())
        assert report["n-samples"]["posttrain_sums_choice"]["effective"] == 12
    # the same weights under two names: the same scores (the harness is deterministic here)
    assert {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("base/harness/")} == \
        {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("again/harness/")}
    assert all(sanitize_metric_name(k) == k for k in metrics)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics


def test_metric_names_mlflow_accepts():
    assert metric_name("policy", "gsm8k", "exact_match,strict-match") == "policy/harness/gsm8k/exact_match/strict-match"
    assert metric_name("sft", "hellaswag", "acc_norm,none") == "sft/harness/hellaswag/acc_norm"
    assert metric_name("sft", "hellaswag", "alias") is None


def test_the_task_folder_is_a_stage_input_and_a_missing_data_file_is_named(prepared, tmp_path):
    _, root = prepared
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    settings = HarnessSettings(tasks=["posttrain_sums_choice"], include_path=str(folder), limit=2)
    before = harness_sources(settings)["harness.tasks"]["digest"]
    with open(folder / "sums.jsonl", "a") as f:
        f.write(json.dumps({"question": "What is 1 plus 1?", "answer": "2", "choices": ["2", "3"], "label": 0}) + "\n")
    assert harness_sources(settings)["harness.tasks"]["digest"] != before
    (folder / "sums.jsonl").rename(folder / "moved.jsonl")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"sums_\w+.yaml: data file 'sums.jsonl' is not beside the task"):
        evaluate(EvaluateConfig(max_new_tokens=2, max_prompts=2, kl_samples=0, figures=False, harness=settings),
                 root / "data", {"base": root / "base"}, None, tmp_path / "out", seed=0)
