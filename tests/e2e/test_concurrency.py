"""Two `posttrain run` processes with the same recipe and the same state folder, started at the same
moment (the local default: the state folder's local Prefect server, MLflow in SQLite, the artifact store
on disk). Both finish, they share one Prefect server, and every stage key holds exactly one complete
output. A later run reuses the server; `posttrain server stop` stops it."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from flows.local_server import _alive
from tasks.machinery.store import MANIFEST, ArtifactStore, Ref

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def _env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(POSTTRAIN_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _posttrain(home, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("concurrent-home")
    try:
        procs = [_posttrain(home, "run", "--config", "configs/tiny.yaml", "--summary-json", str(home / f"summary-{i}.json"))
                 for i in (1, 2)]
        outputs = [p.communicate(timeout=900)[0] for p in procs]
        for proc, output in zip(procs, outputs):
            assert proc.returncode == 0, output[-5000:]
        yield home, [json.loads((home / f"summary-{i}.json").read_text()) for i in (1, 2)], outputs
    finally:
        _posttrain(home, "server", "stop").communicate(timeout=60)


def test_both_runs_finish_with_the_same_outputs(two_runs):
    _, (a, b), _ = two_runs
    assert [s["name"] for s in a["stages"]] == [s["name"] for s in b["stages"]]
    assert all(s["status"] in ("completed", "cached") for s in a["stages"] + b["stages"])
    assert [(s["output_uri"], s["output_digest"]) for s in a["stages"]] == \
        [(s["output_uri"], s["output_digest"]) for s in b["stages"]]


def test_each_stage_key_holds_one_complete_uncorrupted_output(two_runs):
    home, (summary, _), _ = two_runs
    store = ArtifactStore(str(home / "artifacts"))
    for stage in summary["stages"]:
        folder = home / "artifacts" / stage["kind"] / stage["cache_key"]
        manifest = json.loads((folder / MANIFEST).read_text())
        attempts = sorted(p.name for p in folder.iterdir() if p.name.startswith("attempt-"))
        assert attempts == [manifest["attempt"]], f"{stage['name']}: {attempts} (one output, no duplicate)"
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "no temporary manifest left"
        assert store.problem(Ref(stage["output_uri"], stage["output_digest"])) is None


def test_mlflow_shows_two_finished_pipelines_with_every_stage_finished(two_runs):
    _, summaries, _ = two_runs
    client = MlflowClient(summaries[0]["tracking_uri"])
    for summary in summaries:
        parent = client.get_run(summary["mlflow_run_id"])
        assert parent.info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(r.data.tags["posttrain.stage"] for r in children) == sorted(s["name"] for s in summary["stages"])
        assert {r.info.status for r in children} == {"FINISHED"}


def test_the_runs_share_one_local_prefect_server_that_later_runs_reuse_and_stop_stops(two_runs):
    home, _, outputs = two_runs
    started = [o for o in outputs if "started a local Prefect server" in o]
    assert len(started) == 1, "one of the two runs started the server, the other used it"
    state = json.loads((home / "prefect" / "posttrain-server.json").read_text())
    assert _alive(state["pid"]), "still running after both runs ended"
    again = _posttrain(home, "run", "--config", "configs/tiny.yaml", "--summary-json", str(home / "summary-3.json"))
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert "started a local Prefect server" not in output
    assert json.loads((home / "prefect" / "posttrain-server.json").read_text())["pid"] == state["pid"]
    assert {s["status"] for s in json.loads((home / "summary-3.json").read_text())["stages"]} == {"cached"}
    stop = _posttrain(home, "server", "stop")
    assert f"stopped the local Prefect server (pid {state['pid']}" in stop.communicate(timeout=60)[0]
    assert not _alive(state["pid"])
