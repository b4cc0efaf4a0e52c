import os

# Tests never reach a hub and never send telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A real S3 endpoint (moto server) on 127.0.0.1, started on first use and shared by the session."""
    from tests.servers import start_moto

    server, aws = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield {"server": server, "aws": aws, "url": aws["AWS_ENDPOINT_URL"]}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_server_process(tmp_path_factory):
    """`prefect server start` on 127.0.0.1, shared by the suites that run flows in other processes."""
    from tests.servers import start_prefect

    server = start_prefect(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, moto_s3):
    """`mlflow server` on SQLite with its artifacts on the moto S3 bucket `mlflow-artifacts`."""
    from tests.servers import s3_client, start_mlflow

    aws = moto_s3["aws"]
    s3_client(aws).create_bucket(Bucket="mlflow-artifacts")
    server = start_mlflow(tmp_path_factory.mktemp("mlflow-server"), artifacts="s3://mlflow-artifacts/",
                          extra_env={**aws, "MLFLOW_S3_ENDPOINT_URL": aws["AWS_ENDPOINT_URL"]})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_s3, monkeypatch):
    """This process talks to the moto endpoint (fresh s3fs instances, so no stale endpoint is reused)."""
    import s3fs

    for name, value in moto_s3["aws"].items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield moto_s3
    s3fs.S3FileSystem.clear_instance_cache()
