"""What the benchmark scripts share: running `posttrain` as a user would (a subprocess, its own state
folder), timing it, and stopping the state folder's local Prefect server afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "POSTTRAIN_PROGRESS": "0",
       "TOKENIZERS_PARALLELISM": "false"}


def timed(cmd: list[str], env: dict, log: Path) -> float:
    """Run `cmd` from the project folder with its output in `log`; its wall time, or exit naming the log."""
    started = time.perf_counter()
    with open(log, "w") as f:
        result = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed (exit {result.returncode}); see {log}")
    return elapsed


def posttrain_run(home: Path, name: str, *overrides: str, env: dict | None = None,
                  config: str | None = None, extra: list[str] | None = None) -> tuple[float, dict]:
    """`posttrain run --set ...` (the demo recipe, or `config`; `extra`: more arguments such as --only) in state
    folder `home`: (wall seconds, summary)."""
    summary = home / f"{name}.json"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--summary-json", str(summary)]
    if config:
        cmd += ["--config", config]
    for item in overrides:
        cmd += ["--set", item]
    cmd += extra or []
    wall = timed(cmd, {**ENV, **(env or {}), "POSTTRAIN_HOME": str(home)}, home / f"{name}.log")
    return wall, json.loads(summary.read_text())


def stop_server(home: Path) -> None:
    subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], cwd=ROOT, capture_output=True,
                   env={**ENV, "POSTTRAIN_HOME": str(home)})
