"""The MLflow tracking server is stopped in the middle of a training stage and started again (same
port, same database). The run rides it out on the client's retries: every stage ends FINISHED on the
server, and no point of the training curve logged during the outage is lost."""

import time

import pytest
from mlflow.tracking import MlflowClient

from .conftest import Pipeline, digests

pytestmark = pytest.mark.faults


def test_mlflow_server_restarted_mid_run(tmp_path, prefect_api, reference, mlflow_server):
    uri = mlflow_server.client_uri
    # The client's retry budget (10 retries, backoff capped at 120 s: about 10 minutes) bounds how long
    # a restart may take; measured restarts take under a minute on a busy 2-core machine.
    p = Pipeline(tmp_path / "home", prefect_api, env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10"})
    p.wait_for_line(r"\[sft\] running")
    mlflow_server.stop()
    down_at = time.time()
    time.sleep(3)
    mlflow_server.start()  # takes 20-30 s on this machine: the outage is that long
    up_at = time.time()
    code, summary = p.wait()
    assert code == 0, p.output()
    assert digests(summary) == reference["digests"]

    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["posttrain.stage"]: r.info.status for r in children} == \
        {s["name"]: "FINISHED" for s in summary["stages"]}
    sft = next(r for r in children if r.data.tags["posttrain.stage"] == "sft")
    assert sft.info.start_time / 1000 < down_at and sft.info.end_time / 1000 > up_at, \
        "the sft stage was running across the outage"
    curve = client.get_metric_history(sft.info.run_id, "train/loss")
    assert sorted(m.step for m in curve) == [2, 4, 6, 8, 10, 12], "no point of the curve was lost in the outage"
