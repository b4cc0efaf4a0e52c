"""Fail points: SIGKILL this process at a named point, so the fault-injection tests can kill a stage
exactly where a crash hurts most (every output file written, the manifest not yet; half-way through
training) instead of at a random moment. Off unless POSTTRAIN_KILL_AT names the point:

    POSTTRAIN_KILL_AT=sft:commit     the sft output is written but not committed
    POSTTRAIN_KILL_AT=sft:step-5     right after optimizer step 5 of the sft stage
"""

from __future__ import annotations

import os
import signal

ENV = "POSTTRAIN_KILL_AT"


def kill_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def step_kill_callback(stage: str):
    """A transformers callback with a kill point after every optimizer step, or None when none is armed."""
    armed = os.environ.get(ENV, "")
    if not armed.startswith(f"{stage}:step-"):
        return None
    from transformers import TrainerCallback

    class _KillAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            kill_point(f"{stage}:step-{state.global_step}")

    return _KillAfterStep()
