"""Fail points: SIGKILL this process at a named point, so the fault-injection tests can kill a stage
exactly where a crash hurts most (every output file written, the manifest not yet; half-way through
training) instead of at a random moment. Off unless POSTTRAIN_KILL_AT names the point:

    POSTTRAIN_KILL_AT=sft:commit     the sft output is written but not committed
    POSTTRAIN_KILL_AT=sft:step-5     right after optimizer step 5 of the sft stage

With POSTTRAIN_KILL_ONCE=<marker file>, only the first process to reach the point dies (it creates the
marker): one rank of several, and not again when the stage restarts.

Hold points let a test act between two events instead of racing a timer: with
POSTTRAIN_HOLD_AT=<point>=<gate file>, the process waits at that point until the gate file exists.

    POSTTRAIN_HOLD_AT='*:retry=/tmp/gate'   a failed stage waits before its retry (e.g. to free disk space)
    POSTTRAIN_HOLD_AT='dpo_*:start=/tmp/gate'  matching stages wait when they start (e.g. until both branches have)
    POSTTRAIN_HOLD_AT='sft:step-12=/tmp/gate'  every rank waits after optimizer step 12
Several points: separated by ';'.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import time
from pathlib import Path

ENV = "POSTTRAIN_KILL_AT"
HOLD_ENV = "POSTTRAIN_HOLD_AT"
ONCE_ENV = "POSTTRAIN_KILL_ONCE"


def kill_point(name: str) -> None:
    if os.environ.get(ENV) != name:
        return
    once = os.environ.get(ONCE_ENV)
    if once:  # the first process to reach the point dies; a restarted one (and its peers) go on
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def hold_point(name: str) -> None:
    for entry in filter(None, os.environ.get(HOLD_ENV, "").split(";")):
        point, _, gate = entry.partition("=")
        if not fnmatch.fnmatchcase(name, point):
            continue
        logging.getLogger("posttrain").warning("held at %s until %s exists", name, gate)
        while not Path(gate).exists():
            time.sleep(0.1)


def step_kill_callback(stage: str):
    """A transformers callback with a kill point and a hold point after every optimizer step, or None when
    neither is armed for this stage."""
    if not any(os.environ.get(env, "").startswith(f"{stage}:step-") for env in (ENV, HOLD_ENV)):
        return None
    from transformers import TrainerCallback

    class _KillAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            kill_point(f"{stage}:step-{state.global_step}")
            hold_point(f"{stage}:step-{state.global_step}")

    return _KillAfterStep()
