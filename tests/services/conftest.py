"""Real servers for the services tests: moto's S3, an MLflow tracking server with its artifacts on
that S3, and a Prefect server (tests/servers.py)."""

import pytest

from tests.servers import ACCESS_KEY, MLFLOW_PASSWORD, ROOT, SECRET, api_url, clean_env, s3_client  # noqa: F401


@pytest.fixture(scope="session")
def services(tmp_path_factory, moto_s3, prefect_server_process, mlflow_server):
    """S3 (moto), MLflow and Prefect; yields the environment a client or worker needs."""
    work = tmp_path_factory.mktemp("services")
    aws = moto_s3["aws"]
    s3 = s3_client(aws)
    s3.create_bucket(Bucket="posttrain")
    client_env = {
        **clean_env(), **aws,
        "PREFECT_API_URL": api_url(prefect_server_process),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The tracking URI carries the MLflow password, as many deployments do: it must stay out of Prefect.
        "MLFLOW_TRACKING_URI": mlflow_server.client_uri,
        "POSTTRAIN_HOME": str(work / "worker-home"),
        "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "POSTTRAIN_PROGRESS": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {"env": client_env, "work": work, "s3": s3, "s3_url": aws["AWS_ENDPOINT_URL"],
            "mlflow_uri": client_env["MLFLOW_TRACKING_URI"], "prefect_api": client_env["PREFECT_API_URL"]}
