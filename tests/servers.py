"""Real servers on 127.0.0.1 for tests: moto's S3, MLflow tracking servers and a Prefect server.
Each runs as a separate process, is polled until it answers, and is terminated (process group)
when its fixture ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_stages() -> list[str]:
    """The tiny recipe's stage instances, in order, as the recipe graph gives them."""
    from flows.config import load_config
    from flows.graph import build_nodes

    return [node.name for node in build_nodes(load_config(ROOT / "configs" / "tiny.yaml"))]
SECRET = "posttrain-test-secret-0451"
ACCESS_KEY = "posttrain-test-access-key"
MLFLOW_USER, MLFLOW_PASSWORD = "admin", "posttrain-mlflow-password-7731"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    """This process's environment without Prefect, MLflow or AWS settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}


class Server:
    def __init__(self, name: str, cmd: list[str], url: str, env: dict, log: Path, timeout: float = 240):
        self.name, self.cmd, self.url, self.env, self.log, self.timeout = name, cmd, url, env, log, timeout
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status < 500:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self.url} within {self.timeout} s:\n"
                           f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)


# A `prefect worker start` (Prefect 3.9 here) did not exit within 90 s of SIGTERM or SIGINT, idle: waiting
# for it only delays the teardown, so workers get a short grace before SIGKILL.
WORKER_GRACE = 5


def stop_process_group(*procs: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM processes started with start_new_session=True and their children; SIGKILL those still running
    `grace` seconds later (one deadline for all of them)."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_moto(work: Path) -> tuple[Server, dict]:
    """moto's S3 server; returns it and the AWS_* settings a client needs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Server("moto S3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    f"{url}/moto-api/", clean_env(), work / "moto.log", timeout=60)
    aws = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    return server, aws


def s3_client(aws: dict):
    import boto3

    return boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"], region_name=aws["AWS_DEFAULT_REGION"])


def start_mlflow(work: Path, name: str = "mlflow", artifacts: str | None = None, extra_env: dict | None = None,
                 port: int | None = None, auth: bool = False) -> Server:
    """`mlflow server` on SQLite; artifacts proxied to `artifacts` (default: a local folder). With `auth`,
    MLflow's basic-auth app: every request needs MLFLOW_USER / MLFLOW_PASSWORD, and `server.client_uri`
    carries them (http://user:password@host:port), as a tracking URI with a password does in production."""
    port = port or free_port()
    destination = artifacts or str(work / f"{name}-artifacts")
    cmd = [shutil.which("mlflow") or "mlflow", "server", "--backend-store-uri", f"sqlite:///{work}/{name}.db",
           "--artifacts-destination", destination, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**clean_env(), **(extra_env or {})}
    if auth:
        ini = work / f"{name}-auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{work}/{name}-auth.db\n"
                       f"admin_username = {MLFLOW_USER}\nadmin_password = {MLFLOW_PASSWORD}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        cmd += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "posttrain-test-csrf-key"
    server = Server("MLflow server", cmd, f"http://127.0.0.1:{port}/health", env, work / f"{name}.log")
    server.client_uri = (f"http://{MLFLOW_USER}:{MLFLOW_PASSWORD}@127.0.0.1:{port}" if auth
                         else f"http://127.0.0.1:{port}")
    return server


def start_prefect(work: Path) -> Server:
    port = free_port()
    env = {**clean_env(), "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    return Server("Prefect server",
                  [shutil.which("prefect") or "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  f"http://127.0.0.1:{port}/api/health", env, work / "prefect.log")


def api_url(prefect: Server) -> str:
    return prefect.url.rsplit("/health", 1)[0]


def task_run_states(client, flow_run_ids, names, timeout: float = 120) -> dict[str, str]:
    """{task name: state name} of the named task runs in these flow runs, read from the Prefect server.

    Clients report task-run states as events that the server records a moment later, so this waits (up to
    `timeout` seconds) until every named task run has a final state; whatever is there by then is returned,
    for the caller's assertion to show."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))
        states = {r.name: r.state for r in runs if r.name in names and r.state is not None}
        if (set(states) == set(names) and all(s.is_final() for s in states.values())) or time.monotonic() > deadline:
            return {name: state.name for name, state in states.items()}
        time.sleep(0.5)


class HubAPI:
    """A local HTTP server that answers the Hugging Face Hub's repo-info API (GET /api/{models,datasets}/<org>/
    <name>[/revision/<rev>]) the way the Hub does: 200 with the resolved commit for the repos it knows, 404
    with `X-Error-Code: RepoNotFound` (or RevisionNotFound) otherwise. Point HF_ENDPOINT at `url`."""

    def __init__(self, repos: dict[str, str]):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        known = repos  # "models/org/name" or "datasets/org/name" -> commit sha
        self.requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805
                self.requests.append(handler.path)
                parts = handler.path.split("?")[0].strip("/").split("/")
                repo = "/".join(parts[1:4])
                revision = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
                if parts[0] != "api" or repo not in known:
                    return handler._reply(404, {"error": "Repository not found"}, "RepoNotFound")
                if revision not in ("main", known[repo]):
                    return handler._reply(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
                handler._reply(200, {"id": "/".join(parts[2:4]), "sha": known[repo], "siblings": []})

            def _reply(handler, status, body, error_code=None):  # noqa: N805
                import json

                data = json.dumps(body).encode()
                handler.send_response(status)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(data)))
                if error_code:
                    handler.send_header("X-Error-Code", error_code)
                handler.end_headers()
                handler.wfile.write(data)

            def log_message(handler, *args):  # noqa: N805
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class OpenAIServer:
    """tests/openai_server.py in its own process: an OpenAI-compatible chat API judging by a rule."""

    def __init__(self, tmp_path: Path, *args: str):
        port_file = tmp_path / f"port-{time.monotonic_ns()}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--port-file",
                                      str(port_file), *args])
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the OpenAI-compatible test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text()}/v1"

    def stats(self) -> dict:
        import json

        with urllib.request.urlopen(self.url.rsplit("/v1", 1)[0] + "/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
