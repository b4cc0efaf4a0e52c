"""Fault-injection suite: the tiny recipe (with training checkpoints) run as real `posttrain run`
processes against a real Prefect server, with one fault injected per scenario. Every scenario must end
with a completed pipeline whose outputs equal an uninterrupted run's, digest for digest."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import ROOT, api_url, clean_env, tiny_stages

STAGES = tiny_stages()
# Checkpoints every few steps so a killed training stage has something to resume from; quick retries.
RECIPE = [
    "pretrain.training.checkpoint_steps=4", "sft.training.checkpoint_steps=4",
    "reward.training.checkpoint_steps=4", "align.training.checkpoint_steps=2",
    "orchestration.retries=3", "orchestration.retry_delay_seconds=[1]",
]


class Pipeline:
    """One `posttrain run` process of the fault recipe; its output goes to a log file in its home."""

    def __init__(self, home: Path, prefect_api: str, *overrides: str, env: dict | None = None):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        runs = len(list(home.glob("run-*.log")))
        self.log = home / f"run-{runs + 1}.log"
        self.summary_path = home / f"summary-{runs + 1}.json"
        full_env = {**clean_env(), "POSTTRAIN_HOME": str(home), "PREFECT_API_URL": prefect_api,
                    "PREFECT_LOGGING_LEVEL": "WARNING", "POSTTRAIN_PROGRESS": "0", **(env or {})}
        args = [sys.executable, "-m", "flows.cli", "run", "--config", "configs/tiny.yaml",
                "--summary-json", str(self.summary_path)]
        for item in [*RECIPE, *overrides]:
            args += ["--set", item]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 600) -> tuple[int, dict]:
        code = self.proc.wait(timeout=timeout)
        summary = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}
        return code, summary

    def wait_for_line(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log.read_text()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"pipeline ended before {pattern!r}:\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()[-6000:]


@pytest.fixture(scope="session")
def prefect_api(prefect_server_process):
    return api_url(prefect_server_process)


@pytest.fixture(scope="session")
def run_pipeline(prefect_api):
    def run(home: Path, *overrides: str, env: dict | None = None, timeout: float = 600) -> tuple[int, dict, str]:
        p = Pipeline(home, prefect_api, *overrides, env=env)
        code, summary = p.wait(timeout)
        return code, summary, p.output()

    return run


@pytest.fixture(scope="session")
def reference(tmp_path_factory, run_pipeline):
    """An uninterrupted run of the fault recipe: what every faulted run must end up equal to."""
    home = tmp_path_factory.mktemp("reference")
    code, summary, output = run_pipeline(home)
    assert code == 0, output
    return {"home": home, "summary": summary, "digests": digests(summary)}


def digests(summary: dict) -> dict[str, str]:
    return {s["name"]: s["output_digest"] for s in summary["stages"]}


def statuses(summary: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in summary["stages"]}
