"""Which process of a multi-process launch this is (tasks/machinery/launch.py starts them)."""

from __future__ import annotations

import os

# The trainer folder every rank of one launch shares (each rank writes its RNG state into the same checkpoint).
TRAINER_OUTPUT_ENV = "POSTTRAIN_TRAINER_OUTPUT"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
