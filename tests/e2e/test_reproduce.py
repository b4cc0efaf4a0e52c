"""`posttrain reproduce`: rebuild a run from MLflow, exactly on CPU; refuse when code or inputs differ."""

import json

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main

from .conftest import run_cli, write_data

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def original(state_home):
    data = write_data(state_home / "data")
    code, summary = run_cli(state_home, *[f"data.{p}.source={path}" for p, path in data.items()])
    assert code == 0
    return data, summary


def _reproduce(state_home, run_id, *flags):
    out = state_home / "reproduction.json"
    out.unlink(missing_ok=True)
    code = main(["reproduce", run_id, "--summary-json", str(out), *flags])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_reproduction_is_exact_and_tagged(original, state_home, capsys):
    _, summary = original
    code, again = _reproduce(state_home, summary["mlflow_run_id"])
    assert code == 0, capsys.readouterr().err
    assert [s["status"] for s in again["stages"]] == ["completed"] * 6, "nothing may come from cache"
    assert again["storage_root"].startswith(summary["storage_root"] + "/reproductions/")
    timing = ("seconds", "runtime")
    assert {k: v for k, v in again["metrics"].items() if not k.endswith(timing)} == \
        {k: v for k, v in summary["metrics"].items() if not k.endswith(timing)}
    assert {s["name"]: s["output_digest"] for s in again["stages"]} == \
        {s["name"]: s["output_digest"] for s in summary["stages"]}, "equal weights, byte for byte"
    tags = MlflowClient(summary["tracking_uri"]).get_run(again["mlflow_run_id"]).data.tags
    assert tags["posttrain.reproduction_of"] == summary["mlflow_run_id"]
    assert tags["posttrain.reproduce.agrees"] == "True"
    assert "reproduction agrees with the original" in capsys.readouterr().err


def test_changed_input_is_refused_unless_allowed(original, state_home, capsys):
    data, summary = original
    rows = data["preference"].read_text().splitlines()
    data["preference"].write_text("\n".join(rows[:-1]) + "\n")
    try:
        code, _ = _reproduce(state_home, summary["mlflow_run_id"])
        assert code == 3
        err = capsys.readouterr().err
        assert "input data.preference" in err and "--allow-input-change" in err
        code, again = _reproduce(state_home, summary["mlflow_run_id"], "--allow-input-change")
        assert code == 4, "a different input gives different results, reported as a difference"
        tags = MlflowClient(summary["tracking_uri"]).get_run(again["mlflow_run_id"]).data.tags
        assert "data.preference" in tags["posttrain.reproduce.allowed_input_change"]
    finally:
        data["preference"].write_text("\n".join(rows) + "\n")


def test_changed_code_is_refused(original, state_home, capsys):
    _, summary = original
    MlflowClient(summary["tracking_uri"]).set_tag(summary["mlflow_run_id"], "posttrain.source_digest", "0" * 64)
    code, _ = _reproduce(state_home, summary["mlflow_run_id"])
    assert code == 3
    assert "code: the project's source differs" in capsys.readouterr().err


def test_unknown_or_stage_run_id_is_a_clear_error(original, state_home, capsys):
    _, summary = original
    assert _reproduce(state_home, "0" * 32)[0] == 3
    assert "not found" in capsys.readouterr().err
    stage_run = summary["stages"][2]["mlflow_run_id"]
    assert _reproduce(state_home, stage_run)[0] == 3
    assert f"its pipeline run is {summary['mlflow_run_id']}" in capsys.readouterr().err
