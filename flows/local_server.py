"""A local Prefect server per state folder, started once and reused by later runs.

Without PREFECT_API_URL, Prefect would start a temporary server inside every run and stop it at the
end: about 20 s per run on a 2-core machine. Instead, `posttrain run` starts `prefect server start`
as a detached process on 127.0.0.1 with its database in the state folder (PREFECT_HOME), records
where it listens in `<PREFECT_HOME>/posttrain-server.json`, and the next run finds it answering and
uses it at once. It runs the API and the UI (open the URL it prints to watch runs), not the
scheduler: for schedules, run a Prefect server of your own and set PREFECT_API_URL.

`posttrain server status` shows it, `posttrain server stop` stops it.

The server is started before the run's heavy imports, so its start-up overlaps them.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

STATE_FILE = "posttrain-server.json"


class LocalServerError(RuntimeError):
    """The local Prefect server did not come up; the message says where its log is."""


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """The process exists and (where /proc tells) is a Prefect server, not a later process with its pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        return b"prefect" in cmdline and b"server" in cmdline
    except OSError:
        return True


@contextmanager
def _locked(home: Path):
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "posttrain-server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_state(home: Path) -> dict | None:
    try:
        return json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def running(home: Path) -> dict | None:
    """The recorded server of this PREFECT_HOME if its process is alive and it answers, else None."""
    state = _read_state(home)
    if state and _alive(state["pid"]) and _answers(state["api_url"]):
        return state
    return None


class LocalServer:
    """A started (or found) server; `wait()` blocks until it answers."""

    def __init__(self, home: Path, state: dict, process: subprocess.Popen | None):
        self.home, self.state, self.process = home, state, process

    @property
    def api_url(self) -> str:
        return self.state["api_url"]

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def wait(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _answers(self.api_url, timeout=1.0):
                return
            ended = self.process.poll() is not None if self.process else not _alive(self.state["pid"])
            if ended:
                raise LocalServerError(f"the local Prefect server (pid {self.state['pid']}) exited while starting; "
                                       f"see {self.home / 'posttrain-server.log'}")
            time.sleep(0.2)
        raise LocalServerError(f"the local Prefect server did not answer within {timeout:.0f} s; "
                               f"see {self.home / 'posttrain-server.log'}")


def start_or_find(home: Path) -> LocalServer:
    """This state folder's server: the one running (or starting), or a new detached `prefect server
    start`. Not waited for: call `.wait()` before the first API call. Two runs starting at once start one."""
    with _locked(home):
        state = _read_state(home)
        if state and _alive(state["pid"]):
            return LocalServer(home, state, None)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_SERVER_LOGGING_LEVEL": os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")}
        env.pop("PREFECT_API_URL", None)
        log = open(home / "posttrain-server.log", "a")
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-services", "--analytics-off"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        state = {"pid": process.pid, "port": port, "api_url": f"http://127.0.0.1:{port}/api",
                 "ui_url": f"http://127.0.0.1:{port}", "started": time.time()}
        # Until the child has exec'd, its command line is still this process's, and another run taking the
        # lock next would not recognise it as the server and start a second one on the same database.
        deadline = time.monotonic() + 30
        while not _alive(process.pid) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        (home / STATE_FILE).write_text(json.dumps(state))
        return LocalServer(home, state, process)


def stop(home: Path, timeout: float = 30.0) -> dict | None:
    """Stop this state folder's server; returns what was stopped, or None if none was running."""
    with _locked(home):
        state = _read_state(home)
        (home / STATE_FILE).unlink(missing_ok=True)
        if not state or not _alive(state["pid"]):
            return None
        try:
            os.killpg(state["pid"], signal.SIGTERM)
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(state["pid"]):
            try:
                os.waitpid(state["pid"], os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        if _alive(state["pid"]):
            os.killpg(state["pid"], signal.SIGKILL)
        return state
