import socket
from pathlib import Path

import pytest

from flows.config import load_config
from flows.preflight import PreflightError, check_storage, check_tracking, preflight

ROOT = Path(__file__).resolve().parents[2]


def tiny_on(base: str, folder: Path) -> Path:
    """configs/tiny.yaml with an existing model in place of the from-scratch one (a recipe that extends it)."""
    recipe = folder / "tiny-on-a-model.yaml"
    recipe.write_text(f"extends: {ROOT / 'configs' / 'tiny.yaml'}\n"
                      f"stages:\n  pretrain: null\n  sft: {{inputs: {{base: {base}}}}}\n"
                      f"  evaluate: {{inputs: {{base: {base}}}}}\n")
    return recipe


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_server_is_named_before_any_compute():
    with pytest.raises(PreflightError, match=r"tracking.uri http://127.0.0.1:\d+: MLflow server unreachable"):
        check_tracking(f"http://127.0.0.1:{_closed_port()}", timeout=2)


def test_credentials_in_the_tracking_uri_are_not_echoed():
    with pytest.raises(PreflightError) as err:
        check_tracking(f"http://bob:hunter2@127.0.0.1:{_closed_port()}", timeout=2)
    assert "hunter2" not in str(err.value) and "***@" in str(err.value)
    assert "Connection refused" in str(err.value), "the host is 127.0.0.1, not the user name"


def test_unreachable_s3_endpoint_is_named(monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(PreflightError, match=r"storage.root s3://nowhere/x: cannot reach the store"):
        check_storage("s3://nowhere/x")
    s3fs.S3FileSystem.clear_instance_cache()


def test_unknown_model_path_is_named(tmp_path):
    cfg = load_config(tiny_on(str(tmp_path / "no-such-model"), tmp_path))
    with pytest.raises(PreflightError, match=r"stages.sft.inputs.base: model .*no-such-model: no such folder"):
        preflight(cfg)
    (tmp_path / "folder").mkdir()
    cfg = load_config(tiny_on(str(tmp_path / "folder"), tmp_path))
    with pytest.raises(PreflightError, match=r"stages.sft.inputs.base: model .*folder: no config.json"):
        preflight(cfg)


def test_a_misspelled_hub_id_fails_pre_flight_and_a_real_one_is_pinned(tmp_path):
    """Against a local server speaking the Hub's API (HF_ENDPOINT): the run stops before any compute, naming
    the stage input; a known repo resolves to its commit. In a fresh process, as the Hub settings are read
    when huggingface_hub is imported."""
    import json
    import os
    import subprocess
    import sys

    from tests.servers import HubAPI

    commit = "a" * 40
    hub = HubAPI({"models/org/real-model": commit, "datasets/org/real-data": "b" * 40})
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "POSTTRAIN_HOME": str(tmp_path / "home"),
               "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
        check = ("import json, sys; from flows.config import load_config; from flows.preflight import preflight, "
                 "PreflightError; from tasks.machinery.modeling import resolve_model; from tasks.machinery.fingerprints import "
                 "resolve_hub_revision\n"
                 "cfg = load_config(sys.argv[1], sys.argv[2:])\n"
                 "try:\n    preflight(cfg); print(json.dumps({'ok': True, 'model': resolve_model('org/real-model'), "
                 "'data': resolve_hub_revision('org/real-data', None, 'dataset')}))\n"
                 "except PreflightError as e:\n    print(json.dumps({'ok': False, 'error': str(e)}))\n")

        def preflight_of(*overrides):
            out = subprocess.run([sys.executable, "-c", check, str(tiny_on("org/real-model", tmp_path)), *overrides], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout.strip().splitlines()[-1])

        tracking = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        wrong = preflight_of("sft.inputs.base=org/reel-model", *tracking)
        assert not wrong["ok"] and "stages.sft.inputs.base: model org/reel-model: org/reel-model: no such model on the " \
                                   "Hugging Face Hub" in wrong["error"]
        bad_data = preflight_of("prepare_data.sft.source=hf:org/no-data", *tracking)
        assert not bad_data["ok"] and "stages.prepare_data.sft.0: org/no-data: no such dataset" in bad_data["error"]
        good = preflight_of(*tracking)
        assert good["ok"] and good["model"]["revision"] == commit and good["data"] == "b" * 40
        assert any(p.startswith("/api/models/org/reel-model") for p in hub.requests)
    finally:
        hub.stop()
