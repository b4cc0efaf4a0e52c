"""Transient faults are retried with backoff; deterministic ones fail at once; a rerun resumes."""

import pytest
from mlflow.tracking import MlflowClient

import tasks.kinds.sft

from .conftest import run_cli, write_data

pytestmark = pytest.mark.e2e
FAST_RETRY = ["orchestration.retries=2", "orchestration.retry_delay_seconds=[0.1]"]


@pytest.fixture(scope="module")
def data_overrides(state_home):
    return [f"prepare_data.{p}.source={path}" for p, path in write_data(state_home / "data").items()]


def _sft_runs(summary):
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_run_id"])
    return client.search_runs([parent.info.experiment_id], order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                            f"and tags.`posttrain.stage` = 'sft'")


def _fail_first_calls(monkeypatch, exc: BaseException, times: int):
    real, calls = tasks.kinds.sft.train_sft, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.kinds.sft, "train_sft", flaky)
    return calls


def test_deterministic_failure_fails_at_once_and_a_rerun_resumes_at_that_stage(state_home, data_overrides, monkeypatch):
    calls = _fail_first_calls(monkeypatch, ValueError("sft: bad hyperparameter"), times=1)
    code, failed = run_cli(state_home, *data_overrides, *FAST_RETRY, "seed=11")
    assert code == 1 and calls["n"] == 1, "a deterministic error is not retried"
    assert [(s["name"], s["status"]) for s in failed["stages"]][-1] == ("sft", "failed")
    [sft_run] = _sft_runs(failed)
    assert sft_run.info.status == "FAILED" and "bad hyperparameter" in sft_run.data.tags["posttrain.error"]

    code, resumed = run_cli(state_home, *data_overrides, *FAST_RETRY, "seed=11")
    assert code == 0
    assert {s["name"]: s["status"] for s in resumed["stages"]} == {
        "prepare_data": "cached", "pretrain": "cached", "sft": "completed", "reward": "completed",
        "align": "completed", "evaluate": "completed"}


def test_transient_failure_is_retried_and_the_stage_completes(state_home, data_overrides, monkeypatch):
    calls = _fail_first_calls(monkeypatch, ConnectionError("S3 endpoint reset the connection"), times=2)
    code, summary = run_cli(state_home, *data_overrides, *FAST_RETRY, "seed=12")
    assert code == 0 and calls["n"] == 3
    runs = _sft_runs(summary)
    assert [r.info.status for r in runs] == ["FAILED", "FAILED", "FINISHED"]
    assert all(s["status"] == "completed" for s in summary["stages"])
