"""The tiny recipe through a Prefect deployment and a process worker, against real servers:
artifacts and Prefect results on S3 (moto), tracking on an MLflow server whose artifacts are on S3.
Everything is checked with clients that do not use the project's code."""

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.servers import WORKER_GRACE, stop_process_group, task_run_states, tiny_stages

from .conftest import ACCESS_KEY, MLFLOW_PASSWORD, ROOT, SECRET

pytestmark = pytest.mark.services
STAGES = tiny_stages()
DEPLOYMENT = "posttrain/tiny-services"


def _posttrain(env, *args, timeout=300):
    result = subprocess.run(["posttrain", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def prefect_client(services):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: services["prefect_api"]}):
        from prefect import get_client

        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def worker(services):
    """A process worker for the pipeline's pool, and one for the pool evaluation is sent to."""
    procs = []
    for pool in ("svc-cpu", "svc-eval"):
        log = services["work"] / f"worker-{pool}.log"
        procs.append(subprocess.Popen(["prefect", "worker", "start", "--pool", pool, "--type", "process"],
                                      env=services["env"], cwd=ROOT, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    yield services["work"] / "worker-svc-cpu.log"
    stop_process_group(*procs, grace=WORKER_GRACE)


@pytest.fixture(scope="module")
def deployment(services, prefect_client):
    out = _posttrain(services["env"], "deploy", "--config", "configs/tiny.yaml", "--name", "tiny-services",
                     "--pool", "svc-cpu", "--cron", "0 3 * * *", "--set", "storage.root=s3://posttrain/runs",
                     "--set", "orchestration.stage_pools.evaluate=svc-eval")
    assert "deployment posttrain/tiny-services" in out
    return prefect_client.read_deployment_by_name(DEPLOYMENT)


def _trigger_and_wait(client, deployment, parameters, timeout=900):
    """What the UI's Run button does: a flow run from the deployment, with custom parameters."""
    run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run.id)
        if run.state and run.state.is_final():
            return run
        time.sleep(3)
    raise AssertionError(f"flow run {run.id} not finished after {timeout} s (state {run.state})")


def _with_overrides(deployment, *overrides):
    """The run form as a user fills it: the deployment's recipe, one more dotted override."""
    return {"recipe": deployment.parameters["recipe"], "overrides": [*deployment.parameters["overrides"], *overrides]}


@pytest.fixture(scope="module")
def first_run(prefect_client, deployment, worker):
    run = _trigger_and_wait(prefect_client, deployment, _with_overrides(deployment, "align.beta=0.15"))
    assert run.state.is_completed(), f"{run.state}: see {worker}\n{Path(worker).read_text()[-4000:]}"
    return run


def _child_flow_runs(client, flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))


def _stage_task_states(client, flow_run_id):
    """State of each stage task, in the pipeline's flow run or in a stage flow run it started."""
    ids = [flow_run_id, *(r.id for r in _child_flow_runs(client, flow_run_id))]
    return task_run_states(client, ids, STAGES)


def _mlflow_parent(services, flow_run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=services["mlflow_uri"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert len(runs) == 1, runs
    return client, runs[0]


def test_deployment_has_a_cron_schedule_and_a_typed_form(deployment, prefect_client):
    schedules = prefect_client.read_deployment_schedules(deployment.id)
    assert [s.schedule.cron for s in schedules] == ["0 3 * * *"]
    schema = deployment.parameter_openapi_schema
    # The form leads with what changes per run; the full typed recipe is there, below.
    order = sorted(schema["properties"], key=lambda p: schema["properties"][p]["position"])
    assert order[:3] == ["recipe", "overrides", "config"]
    definitions = schema.get("definitions") or schema.get("$defs")
    assert {"PipelineConfig", "DPOStageInstance", "DPOTraining", "LoraSettings"} <= set(definitions)
    assert definitions["DPOStageInstance"]["properties"]["beta"]["description"]
    assert deployment.parameters == {"recipe": "configs/tiny.yaml", "overrides": [
        "storage.root=s3://posttrain/runs", "orchestration.stage_pools.evaluate=svc-eval"]}


def test_triggered_run_with_overridden_parameter_completes(first_run, services):
    client, parent = _mlflow_parent(services, str(first_run.id))
    assert parent.info.status == "FINISHED"
    assert parent.data.params["stages.align.beta"] == "0.15"
    assert {parent.data.tags[f"posttrain.status.{s}"] for s in STAGES} == {"completed"}


def test_evaluation_ran_on_its_own_work_pool(first_run, prefect_client):
    [child] = _child_flow_runs(prefect_client, first_run.id)
    assert child.work_pool_name == "svc-eval" and child.state.is_completed()
    assert prefect_client.read_deployment(child.deployment_id).name == "svc-eval"
    assert child.parameters["instance"] == "evaluate" and child.name == "evaluate"
    assert _stage_task_states(prefect_client, first_run.id) == {s: "Completed" for s in STAGES}


def test_artifacts_and_prefect_results_are_in_the_bucket(first_run, services):
    keys = []
    for page in services["s3"].get_paginator("list_objects_v2").paginate(Bucket="posttrain", Prefix="runs/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    for kind in ("prepare_data", "pretrain", "sft", "reward", "dpo", "evaluate"):  # outputs live by kind
        assert any(k.startswith(f"runs/{kind}/") and k.endswith("/MANIFEST.json") for k in keys), kind
    assert any(k.startswith("runs/dpo/") and k.endswith("model.safetensors") for k in keys)
    assert any(k.startswith("runs/prefect-results/") for k in keys)


def test_mlflow_server_holds_curves_tables_and_a_loadable_policy(first_run, services, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM

    client, parent = _mlflow_parent(services, str(first_run.id))
    children = {r.data.tags["posttrain.stage"]: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == set(STAGES)
    assert len(client.get_metric_history(children["sft"].info.run_id, "train/loss")) >= 3
    table = json.loads(Path(client.download_artifacts(children["evaluate"].info.run_id, "samples/generations.json",
                                                      str(tmp_path))).read_text())
    assert {"prompt", "sft", "policy"} <= set(table["columns"])
    mlflow.set_tracking_uri(services["mlflow_uri"])
    local = mlflow.artifacts.download_artifacts(f"runs:/{children['align'].info.run_id}/policy",
                                                dst_path=str(tmp_path / "policy"))
    assert AutoModelForCausalLM.from_pretrained(local).num_parameters() > 0
    stored = services["s3"].list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])
    assert any(o["Key"].endswith("policy/model.safetensors") for o in stored), "MLflow artifacts live on S3"


def test_run_publishes_prefect_artifacts(first_run, prefect_client):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    ids = [first_run.id, *(r.id for r in _child_flow_runs(prefect_client, first_run.id))]
    artifacts = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    by_key = {a.key: a for a in artifacts}
    assert {"posttrain-stages", "posttrain-report", "posttrain-sample-generations"} <= set(by_key)
    report = by_key["posttrain-report"].data
    assert "s3://posttrain/runs/sft/" in report
    for stage in STAGES:  # each stage's row links its MLflow run on the server
        row = next(line for line in report.splitlines() if line.startswith(f"| {stage} |"))
        assert "](http://127.0.0.1:" in row and "/#/experiments/" in row, row


def test_worker_flow_runs_log_each_stage_with_its_mlflow_link(first_run, prefect_client):
    """In a worker's flow-run process (no posttrain CLI there to configure logging), the stages' progress
    lines still reach the flow run's logs in the UI."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    ids = [first_run.id, *(r.id for r in _child_flow_runs(prefect_client, first_run.id))]
    messages = [log.message for log in prefect_client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                                                  limit=200)]
    for stage in STAGES:
        assert any(m.startswith(f"[{stage}] MLflow run http://127.0.0.1:") for m in messages), stage
    assert any(m.startswith("[sft] step ") for m in messages)


def test_no_credentials_reach_mlflow_or_prefect(first_run, services, prefect_client, tmp_path):
    """The AWS secret and the MLflow password (inside the tracking URI, on the client and on both workers)
    appear in no MLflow param, tag or config artifact, and in no Prefect parameter, log or artifact of the
    pipeline's flow run or of the stage flow run on the second pool (whose worker authenticated to MLflow
    with the credentials of its own environment: the server refuses requests without them)."""
    secrets = (SECRET, ACCESS_KEY, MLFLOW_PASSWORD)
    client, parent = _mlflow_parent(services, str(first_run.id))
    runs = [parent, *client.search_runs([parent.info.experiment_id],
                                        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")]
    for run in runs:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert not any(s in text for s in secrets)
    resolved = Path(client.download_artifacts(parent.info.run_id, "config/resolved.yaml", str(tmp_path))).read_text()
    assert not any(s in resolved for s in secrets)
    assert yaml.safe_load(resolved)["storage"]["root"] == "s3://posttrain/runs"
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    [stage_run] = _child_flow_runs(prefect_client, first_run.id)
    assert stage_run.parameters["env"]["tracking_uri"] == services["mlflow_uri"].replace(f"admin:{MLFLOW_PASSWORD}@", "")
    ids = [first_run.id, stage_run.id]
    logs = prefect_client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
    artifacts = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    assert logs and artifacts
    stored = json.dumps({"parameters": [prefect_client.read_flow_run(i).parameters for i in ids],
                         "logs": [log.message for log in logs], "artifacts": [a.data for a in artifacts]}, default=str)
    assert not any(s in stored for s in secrets)


def test_second_run_with_same_parameters_is_all_cache_hits_from_s3(first_run, prefect_client, deployment, services):
    second = _trigger_and_wait(prefect_client, deployment, _with_overrides(deployment, "align.beta=0.15"))
    assert second.state.is_completed()
    assert _stage_task_states(prefect_client, second.id) == {s: "Cached" for s in STAGES}
    _, parent = _mlflow_parent(services, str(second.id))
    assert {parent.data.tags[f"posttrain.status.{s}"] for s in STAGES} == {"cached"}
    # The worker's local artifact cache was never used: outputs and results were read back from S3.
    assert not (Path(services["env"]["POSTTRAIN_HOME"]) / "artifacts").exists()


def test_a_wrong_mlflow_password_is_named_before_any_compute(services, tmp_path):
    env = {**services["env"], "POSTTRAIN_HOME": str(tmp_path),
           "MLFLOW_TRACKING_URI": services["mlflow_uri"].replace(MLFLOW_PASSWORD, "not-the-password")}
    result = subprocess.run(["posttrain", "run", "--config", "configs/tiny.yaml"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the MLflow server refused the credentials (HTTP 401)" in result.stderr
    assert "not-the-password" not in result.stdout + result.stderr
    assert not (tmp_path / "artifacts").exists(), "nothing ran"
