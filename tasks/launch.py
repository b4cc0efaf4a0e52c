"""Multi-process training: run a stage's training function under torchrun or accelerate launch (DDP).

`run_training` calls the function in this process when `processes` is 1; otherwise it writes a
spec file and launches `python -m tasks.launch SPEC` once per process. Every rank trains; rank 0
alone saves the model, logs to MLflow and writes the metrics back. The ranks share one trainer
folder, so a checkpoint holds every rank's RNG state; rank 0 uploads it to the store, and every
rank resumes from the newest stored one. On CPU the processes talk over
gloo; on GPUs over NCCL, and `accelerate_config` may name a DeepSpeed or FSDP config file.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tasks.training import TrainingSettings


TRAINER_OUTPUT_ENV = "POSTTRAIN_TRAINER_OUTPUT"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _function(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def launch_command(t: TrainingSettings, spec: Path) -> list[str]:
    if t.launcher == "accelerate":
        cmd = [shutil.which("accelerate") or "accelerate", "launch", "--num_processes", str(t.processes)]
        if t.accelerate_config:
            cmd += ["--config_file", t.accelerate_config]
        return [*cmd, "-m", "tasks.launch", str(spec)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(t.processes)]
    return [*torchrun, "-m", "tasks.launch", str(spec)]


def run_training(target: str, t: TrainingSettings, config: dict, inputs: dict[str, Any], out: Path, ctx) -> dict:
    """Call `target(config, inputs, out, ctx)` (a 'module:function'), in t.processes processes."""
    if t.processes <= 1:
        return _function(target)(config, inputs, out, ctx)
    from tasks.stage import RunEnv

    with tempfile.TemporaryDirectory(prefix="posttrain-launch-") as scratch:
        spec = Path(scratch) / "spec.json"
        metrics_path = Path(scratch) / "metrics.json"
        spec.write_text(json.dumps({
            "target": target, "config": config, "inputs": {k: str(v) for k, v in inputs.items()}, "out": str(out),
            "seed": ctx.seed, "env": ctx.env.to_dict() if isinstance(ctx.env, RunEnv) else None,
            "run_id": ctx.run_id, "metrics_path": str(metrics_path), "stage": ctx.stage, "cache_key": ctx.cache_key,
            "trainer_output": str(Path(scratch) / "trainer"),
        }))
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(launch_command(t, spec), env=env, cwd=root)
        if result.returncode != 0:
            raise RuntimeError(f"{t.launcher} with {t.processes} processes failed (exit {result.returncode})")
        return json.loads(metrics_path.read_text())


def main(spec_path: str) -> None:
    from tasks.stage import RunEnv, StageContext

    spec = json.loads(Path(spec_path).read_text())
    env = RunEnv(**spec["env"]) if spec["env"] else None
    ctx = StageContext(seed=spec["seed"], env=env, run_id=spec["run_id"] if is_main_process() else None,
                       stage=spec["stage"], cache_key=spec["cache_key"])
    # One trainer folder for all ranks: each rank writes its own RNG state into the same checkpoint.
    os.environ[TRAINER_OUTPUT_ENV] = spec["trainer_output"]
    inputs = {k: Path(v) if Path(v).exists() else v for k, v in spec["inputs"].items()}
    metrics = _function(spec["target"])(spec["config"], inputs, Path(spec["out"]), ctx)
    ctx.flush()
    if is_main_process():
        Path(spec["metrics_path"]).write_text(json.dumps(metrics))


if __name__ == "__main__":
    main(sys.argv[1])
