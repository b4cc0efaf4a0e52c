"""Look at the Prefect UI the way a user does: deploy the tiny recipe on a local Prefect server, run it
through a process worker, and take headless-Chromium screenshots of the custom-run form, the flow
run's logs, its task runs and its artifacts.

    python tools/ui_screenshots.py --out /tmp/ui       # needs `chromium` on PATH (apt install chromium)

With --mlflow-home STATE_FOLDER (one that `posttrain run` used), it looks at the MLflow UI instead: an MLflow
server on that folder's store, and screenshots of the experiment, the newest pipeline run (overview,
artifacts), its evaluate run, and the model registry.

Prints each screenshot's path and the page heights; the pictures are for a person to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None, method: str = "GET"):
    request = urllib.request.Request(f"{url}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def screenshot(chromium: str, url: str, out: Path, height: int = 1600) -> None:
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1440,{height}", "--virtual-time-budget=20000", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{out}  ({url})", flush=True)


def mlflow_pages(chromium: str, state: Path, out: Path) -> None:
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{state / 'mlflow.db'}"
    port = _free_port()
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1"], stdout=open(out / "mlflow-server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    ui = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{ui}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        client = MlflowClient(store)
        parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    "tags.`posttrain.kind` = 'pipeline'", order_by=["start_time DESC"], max_results=1)[0]
        experiment = parent.info.experiment_id
        evaluate = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                      "tags.`posttrain.kind` = 'evaluate'")[0]
        from tasks.machinery.tracking import TRAINING_VIEW, ui_link

        run_page = f"{ui}/#/experiments/{experiment}/runs"
        screenshot(chromium, f"{ui}/#/experiments/{experiment}", out / "mlflow-experiment-plain-link.png")
        screenshot(chromium, ui_link(ui, experiment), out / "mlflow-experiment.png")
        screenshot(chromium, ui_link(ui, experiment, parent.info.run_id), out / "mlflow-parent-run.png", 2400)
        screenshot(chromium, f"{run_page}/{parent.info.run_id}/artifacts/comparison.png{TRAINING_VIEW}",
                   out / "mlflow-parent-comparison.png")
        screenshot(chromium, f"{run_page}/{parent.info.run_id}/artifacts/win_rates.png{TRAINING_VIEW}",
                   out / "mlflow-parent-win-rates.png")
        screenshot(chromium, f"{run_page}/{parent.info.run_id}/artifacts/training_curves.png{TRAINING_VIEW}",
                   out / "mlflow-parent-training-curves.png")
        screenshot(chromium, ui_link(ui, experiment, evaluate.info.run_id), out / "mlflow-evaluate-run.png", 2400)
        screenshot(chromium, f"{ui}/#/models", out / "mlflow-models.png")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ui-screenshots")
    parser.add_argument("--mlflow-home", help="look at the MLflow UI of this state folder instead")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        sys.exit("no chromium on PATH (apt install chromium)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.mlflow_home:
        return mlflow_pages(chromium, Path(args.mlflow_home).resolve(), out)
    home = Path(tempfile.mkdtemp(prefix="posttrain-ui-"))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "POSTTRAIN_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        for _ in range(180):
            try:
                _api(api, "/health")
                break
            except OSError:
                time.sleep(1)
        subprocess.run(["posttrain", "deploy", "--config", "configs/tiny.yaml", "--name", "tiny-ui", "--pool", "ui"],
                       env=env, cwd=ROOT, check=True)
        procs.append(subprocess.Popen(["prefect", "worker", "start", "--pool", "ui", "--type", "process"], env=env,
                                      cwd=ROOT, stdout=open(home / "worker.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        deployment = _api(api, "/deployments/name/posttrain/tiny-ui")
        run = _api(api, f"/deployments/{deployment['id']}/create_flow_run",
                   {"parameters": {**deployment["parameters"], "overrides": ["align.beta=0.2"]}}, "POST")
        while True:
            state = _api(api, f"/flow_runs/{run['id']}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(3)
        print(f"flow run {run['id']}: {state['type']}", flush=True)
        ui = f"http://127.0.0.1:{port}"
        screenshot(chromium, f"{ui}/deployments/deployment/{deployment['id']}/run", out / "run-form.png", 2400)
        screenshot(chromium, f"{ui}/runs/flow-run/{run['id']}?tab=Logs", out / "flow-run-logs.png", 2400)
        screenshot(chromium, f"{ui}/runs/flow-run/{run['id']}?tab=Task+Runs", out / "flow-run-task-runs.png")
        screenshot(chromium, f"{ui}/runs/flow-run/{run['id']}?tab=Artifacts", out / "flow-run-artifacts.png")
        artifacts = _api(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}, "POST")
        for artifact in artifacts:
            if artifact["key"] in ("posttrain-stages", "posttrain-report", "progress-sft"):
                screenshot(chromium, f"{ui}/artifacts/artifact/{artifact['id']}", out / f"artifact-{artifact['key']}.png",
                           1800)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
