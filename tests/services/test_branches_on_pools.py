"""Two independent branches sent to a work pool run at the same time, and give the outputs the same recipe
gives run locally, one stage after another. No timing: both branches hold when they start until the test
has seen both of them started (a deadlock, failing the test, if they ran one after the other)."""

import json
import subprocess
import time

import pytest

from tests.e2e.test_graph_runs import graph_recipe
from tests.servers import ROOT, WORKER_GRACE, stop_process_group

pytestmark = pytest.mark.services
POOL = "svc-branches"


def _run(env, *args, timeout=900):
    return subprocess.run(["posttrain", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _logs(api: str) -> str:
    """Every log line the Prefect server holds (the stages' lines reach it from the workers' processes)."""
    import urllib.request

    request = urllib.request.Request(f"{api}/logs/filter", data=json.dumps({"limit": 200, "sort": "TIMESTAMP_DESC"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return "\n".join(entry["message"] for entry in json.loads(response.read()))


def _summary(path):
    return {s["name"]: s for s in json.loads(path.read_text())["stages"]}


def test_two_branches_on_a_pool_overlap_and_match_a_local_run(services, tmp_path):
    recipe = graph_recipe(tmp_path)
    env = {**services["env"], "POSTTRAIN_HOME": str(tmp_path / "home")}
    pools = ["--set", f"orchestration.stage_pools.dpo_a={POOL}", "--set", f"orchestration.stage_pools.dpo_b={POOL}"]
    deployed = _run(env, "deploy", "--config", recipe, "--name", "branches", "--pool", "svc-branches-main", *pools,
                    "--set", f"storage.root={tmp_path / 'store'}")
    assert deployed.returncode == 0, deployed.stderr
    gate, log = tmp_path / "both-started", tmp_path / "worker.log"
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", POOL, "--type", "process"],
                              env={**env, "POSTTRAIN_HOLD_AT": f"dpo_*:start={gate}"}, cwd=ROOT,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run = subprocess.Popen(["posttrain", "run", "--config", recipe, "--summary-json", str(tmp_path / "pools.json"),
                                *pools, "--set", f"storage.root={tmp_path / 'store'}"], env=env, cwd=ROOT,
                               stdout=open(tmp_path / "run.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not all(f"held at {b}:start" in _logs(services["prefect_api"]) for b in ("dpo_a", "dpo_b")):
            assert time.monotonic() < deadline and run.poll() is None, \
                f"the two branches were not running at the same time:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        gate.touch()
        assert run.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        stop_process_group(worker, grace=WORKER_GRACE)

    local = _run({**env, "POSTTRAIN_HOME": str(tmp_path / "local-home")}, "run", "--config", recipe,
                 "--summary-json", str(tmp_path / "local.json"), "--set", f"storage.root={tmp_path / 'local-store'}")
    assert local.returncode == 0, local.stderr[-3000:]
    on_pools, here = _summary(tmp_path / "pools.json"), _summary(tmp_path / "local.json")
    assert list(on_pools) == list(here)
    for name in here:
        assert on_pools[name]["status"] == here[name]["status"] == "completed", name
        assert on_pools[name]["output_digest"] == here[name]["output_digest"], name
