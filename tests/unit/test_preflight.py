import socket

import pytest

from flows.config import load_config
from flows.preflight import PreflightError, check_storage, check_tracking, preflight


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
    cfg = load_config(None, ["pretrain.enabled=false", f"model.base={tmp_path / 'no-such-model'}"])
    with pytest.raises(PreflightError, match=r"stages.sft.inputs.base: model .*no-such-model: no such folder"):
        preflight(cfg)
    (tmp_path / "folder").mkdir()
    cfg = load_config(None, ["pretrain.enabled=false", f"model.base={tmp_path / 'folder'}"])
    with pytest.raises(PreflightError, match=r"stages.sft.inputs.base: model .*folder: no config.json"):
        preflight(cfg)
