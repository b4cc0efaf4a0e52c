"""Real servers on 127.0.0.1 for the services tests: moto's S3, an MLflow tracking server with its
artifacts on that S3, and a Prefect server. Each starts as a separate process, is polled until it
answers, and is terminated at the end of the session."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "posttrain-test-secret-0451"
ACCESS_KEY = "posttrain-test-access-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], url: str, env: dict, log: Path, timeout: float = 240):
        self.name, self.url = name, url
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status < 500:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """Start S3 (moto), MLflow and Prefect; yield the environment a client or worker needs."""
    work = tmp_path_factory.mktemp("services")
    s3_port, mlflow_port, prefect_port = free_port(), free_port(), free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    aws = {"AWS_ENDPOINT_URL": s3_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    started = []
    try:
        started.append(Server("moto S3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                              f"{s3_url}/moto-api/", base_env, work / "moto.log", timeout=60))
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
        for bucket in ("posttrain", "mlflow-artifacts"):
            s3.create_bucket(Bucket=bucket)
        mlflow_env = {**base_env, **aws, "MLFLOW_S3_ENDPOINT_URL": s3_url}
        started.append(Server(
            "MLflow server",
            [shutil.which("mlflow") or "mlflow", "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
             "--artifacts-destination", "s3://mlflow-artifacts/", "--host", "127.0.0.1", "--port",
             str(mlflow_port), "--workers", "1"],
            f"http://127.0.0.1:{mlflow_port}/health", mlflow_env, work / "mlflow.log"))
        prefect_env = {**base_env, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
        started.append(Server(
            "Prefect server",
            [shutil.which("prefect") or "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            f"http://127.0.0.1:{prefect_port}/api/health", prefect_env, work / "prefect.log"))
        client_env = {
            **base_env, **aws,
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "POSTTRAIN_HOME": str(work / "worker-home"),
            "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "POSTTRAIN_PROGRESS": "0",
            "TOKENIZERS_PARALLELISM": "false",
        }
        yield {"env": client_env, "work": work, "s3": s3, "s3_url": s3_url,
               "mlflow_uri": client_env["MLFLOW_TRACKING_URI"], "prefect_api": client_env["PREFECT_API_URL"]}
    finally:
        for server in reversed(started):
            server.stop()
