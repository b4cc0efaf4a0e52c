import os

# Tests never reach a hub and never send telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# One math thread per process: the suite runs on two xdist workers, often with a pipeline subprocess
# each, on two cores; more threads only spin against each other. The tiny models lose nothing (the
# learning figures are identical at 1 and 2 threads) and results stay deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def posttrain_home(home):
    """POSTTRAIN_HOME set to `home` (and no MLflow URI from outside) while the block runs."""
    old = os.environ.get("POSTTRAIN_HOME")
    os.environ["POSTTRAIN_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("POSTTRAIN_HOME", None)
        else:
            os.environ["POSTTRAIN_HOME"] = old


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (and result store) for the whole test process. Prefect's events worker
    is one per process and keeps the API URL it started with, so a second harness alongside the first
    would have its task-run events sent to the first server: every suite that runs flows in this process
    shares this one."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


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
    """`mlflow server` on SQLite with its artifacts on the moto S3 bucket `mlflow-artifacts`, behind MLflow's
    basic auth: clients use `mlflow_server.client_uri`, a tracking URI with the password in it."""
    from tests.servers import s3_client, start_mlflow

    aws = moto_s3["aws"]
    s3_client(aws).create_bucket(Bucket="mlflow-artifacts")
    server = start_mlflow(tmp_path_factory.mktemp("mlflow-server"), artifacts="s3://mlflow-artifacts/",
                          extra_env={**aws, "MLFLOW_S3_ENDPOINT_URL": aws["AWS_ENDPOINT_URL"]}, auth=True)
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


# The longest groups start first, so the two workers finish together (xdist hands out groups in order).
_LONGEST_FIRST = ["realmodel/test_smollm2", "faults", "services/test_shared_services", "ray/test_ray_engine",
                  "e2e/test_learning", "e2e/test_reproduce", "services/test_branches_on_pools", "e2e/test_repertoire",
                  "e2e/test_graph_runs", "e2e/test_concurrency", "e2e/test_pipeline"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests under tests/unit/ carry the marker `unit` (`python -m pytest -m unit`: the inner loop, under a
    minute). Parallel runs (pytest-xdist, --dist loadgroup): the fault suite stays on one worker, where it
    shares its servers and its reference run; every other test file is a group of its own."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    groups = {}
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(tests)
        if rel.parts[0] == "unit":
            item.add_marker(pytest.mark.unit)
        groups[item] = "faults" if rel.parts[0] == "faults" else rel.with_suffix("").as_posix()
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))
