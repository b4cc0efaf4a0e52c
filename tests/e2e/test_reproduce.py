"""`posttrain reproduce`: rebuild a run from MLflow, exactly on the same hardware, within a printed tolerance
on other hardware; refuse when code or inputs differ."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main

from tasks.machinery import hardware

from .conftest import ROOT, run_cli, write_data

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def original(state_home):
    data = write_data(state_home / "data")
    code, summary = run_cli(state_home, *[f"prepare_data.{p}.source={path}" for p, path in data.items()])
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
    assert tags["posttrain.reproduce.tolerance"] == "exact equality"
    err = capsys.readouterr().err
    assert "same hardware and versions as the recorded run: comparing with exact equality" in err
    assert "reproduction agrees with the original" in err


def test_every_run_records_its_hardware(original):
    _, summary = original
    client = MlflowClient(summary["tracking_uri"])
    here = {k: str(v) for k, v in hardware.describe().items()}
    runs = [client.get_run(summary["mlflow_run_id"])] + [client.get_run(s["mlflow_run_id"]) for s in summary["stages"]]
    for run in runs:
        recorded = hardware.from_tags(run.data.tags)
        assert recorded["cpu_capability"] == here["cpu_capability"] and recorded["torch_threads"] == here["torch_threads"]
        assert recorded["cpu_model"] and recorded["torch"] == here["torch"]


def test_changed_input_is_refused_unless_allowed(original, state_home, capsys):
    data, summary = original
    rows = data["preference"].read_text().splitlines()
    data["preference"].write_text("\n".join(rows[:-1]) + "\n")
    try:
        code, _ = _reproduce(state_home, summary["mlflow_run_id"])
        assert code == 3
        err = capsys.readouterr().err
        assert "input stages.prepare_data.preference" in err and "--allow-input-change" in err
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


def test_on_other_hardware_it_says_so_and_compares_within_a_printed_tolerance(state_home, tmp_path, capsys):
    """The original computes with torch's scalar CPU kernels (ATEN_CPU_CAPABILITY=default), as a CPU
    without vector instructions would; the reproduction runs on this machine's own (AVX2, AVX-512, ...)."""
    import torch
    from prefect.settings import PREFECT_API_URL

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no vector kernels to differ from the scalar ones")
    other = tmp_path / "other-machine"
    env = {**os.environ, "POSTTRAIN_HOME": str(other), "ATEN_CPU_CAPABILITY": "default",
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", "configs/tiny.yaml",
                             "--summary-json", str(other / "summary.json")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((other / "summary.json").read_text())
    uri = first["tracking_uri"]
    assert MlflowClient(uri).get_run(first["mlflow_run_id"]).data.tags["posttrain.hardware.cpu_capability"] == "DEFAULT"

    out = state_home / "reproduction-other.json"
    code = main(["reproduce", first["mlflow_run_id"], "--tracking-uri", uri, "--summary-json", str(out)])
    err = capsys.readouterr().err
    capability = torch.backends.cpu.get_cpu_capability()
    assert "this machine differs from the one the run computed on" in err
    assert f"cpu_capability: DEFAULT -> {capability}" in err
    assert "metrics are compared within |original - reproduction| <= 0.05 + 0.1 x |original|" in err
    assert code == 0, err[-3000:]
    again = json.loads(out.read_text())
    tags = MlflowClient(uri).get_run(again["mlflow_run_id"]).data.tags
    assert "cpu_capability: DEFAULT" in tags["posttrain.reproduce.hardware_differs"]
    assert tags["posttrain.reproduce.agrees"] == "True"
