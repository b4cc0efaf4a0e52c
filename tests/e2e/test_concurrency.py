"""Two `posttrain run` processes with the same recipe and the same state folder, started at the same
moment (the local default: a temporary Prefect server on one SQLite database, MLflow in SQLite, the
artifact store on disk). Both finish, and every stage key holds exactly one complete output."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tasks.store import MANIFEST, ArtifactStore, Ref

from .conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("concurrent-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(POSTTRAIN_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", "configs/tiny.yaml",
                               "--summary-json", str(home / f"summary-{i}.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-5000:]
    return home, [json.loads((home / f"summary-{i}.json").read_text()) for i in (1, 2)]


def test_both_runs_finish_with_the_same_outputs(two_runs):
    _, (a, b) = two_runs
    assert [s["name"] for s in a["stages"]] == [s["name"] for s in b["stages"]]
    assert all(s["status"] in ("completed", "cached") for s in a["stages"] + b["stages"])
    assert [(s["output_uri"], s["output_digest"]) for s in a["stages"]] == \
        [(s["output_uri"], s["output_digest"]) for s in b["stages"]]


def test_each_stage_key_holds_one_complete_uncorrupted_output(two_runs):
    home, (summary, _) = two_runs
    store = ArtifactStore(str(home / "artifacts"))
    for stage in summary["stages"]:
        folder = home / "artifacts" / stage["name"] / stage["cache_key"]
        manifest = json.loads((folder / MANIFEST).read_text())
        attempts = sorted(p.name for p in folder.iterdir() if p.name.startswith("attempt-"))
        assert attempts == [manifest["attempt"]], f"{stage['name']}: {attempts} (one output, no duplicate)"
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "no temporary manifest left"
        assert store.problem(Ref(stage["output_uri"], stage["output_digest"])) is None


def test_mlflow_shows_two_finished_pipelines_with_every_stage_finished(two_runs):
    _, summaries = two_runs
    client = MlflowClient(summaries[0]["tracking_uri"])
    for summary in summaries:
        parent = client.get_run(summary["mlflow_run_id"])
        assert parent.info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(r.data.tags["posttrain.stage"] for r in children) == sorted(s["name"] for s in summary["stages"])
        assert {r.info.status for r in children} == {"FINISHED"}
