"""Multi-process training: run a stage's training function under torchrun or accelerate launch (DDP).

`run_training` calls the function in this process when `processes` is 1; otherwise it writes a
spec file and launches `python -m tasks.machinery.launch SPEC` once per process. Every rank trains; rank 0
alone saves the model, logs to MLflow and writes the metrics back. The ranks share one trainer
folder, so a checkpoint holds every rank's RNG state; rank 0 uploads it to the store, and every
rank resumes from the newest stored one. On CPU the processes talk over
gloo; on GPUs over NCCL, and `accelerate_config` may name a DeepSpeed or FSDP config file.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tasks.machinery.ranks import TRAINER_OUTPUT_ENV, is_main_process
from tasks.machinery.training import TrainingSettings

logger = logging.getLogger("posttrain")


def launch_command(t: TrainingSettings, spec: Path) -> list[str]:
    if t.launcher == "accelerate":
        cmd = [shutil.which("accelerate") or "accelerate", "launch", "--num_processes", str(t.processes)]
        if t.accelerate_config:
            cmd += ["--config_file", t.accelerate_config]
        return [*cmd, "-m", "tasks.machinery.launch", str(spec)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(t.processes)]
    return [*torchrun, "-m", "tasks.machinery.launch", str(spec)]


class RankFailed(RuntimeError):
    """A rank of a multi-process launch failed; the message names the rank and its error."""


class TransientRankFailure(RankFailed, ConnectionError):
    """A rank failed with an error worth retrying (network, I/O, HTTP 5xx): retried like any other."""


def _qualified(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def run_training(function, t: TrainingSettings, cfg, inputs: dict[str, Any], out: Path, ctx) -> dict:
    """Call `function(cfg, inputs, out, ctx)` (a module-level function) in t.processes processes, or on the
    stage's Ray workers when it runs on Ray (orchestration.engine: ray)."""
    if ctx.env is not None and getattr(ctx.env, "ray", None):
        return _run_on_ray(function, t, cfg, inputs, out, ctx)
    if t.processes <= 1:
        return function(cfg, inputs, out, ctx)
    from tasks.machinery.context import RunEnv

    with tempfile.TemporaryDirectory(prefix="posttrain-launch-") as scratch:
        spec = Path(scratch) / "spec.json"
        metrics_path = Path(scratch) / "metrics.json"
        spec.write_text(json.dumps({
            "target": _qualified(function), "config_class": _qualified(type(cfg)),
            "config": cfg.model_dump(mode="json"), "inputs": {k: v if isinstance(v, dict) else str(v) for k, v in inputs.items()}, "out": str(out),
            "seed": ctx.seed, "env": ctx.env.to_dict() if isinstance(ctx.env, RunEnv) else None,
            "run_id": ctx.run_id, "metrics_path": str(metrics_path), "stage": ctx.stage, "cache_key": ctx.cache_key,
            "round": ctx.round, "refs": ctx.refs,
            "trainer_output": str(Path(scratch) / "trainer"), "errors": scratch,
        }))
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(launch_command(t, spec), env=env, cwd=root)
        if result.returncode != 0:
            raise _launch_failure(t, result.returncode, Path(scratch))
        return json.loads(metrics_path.read_text())


def _run_on_ray(function, t: TrainingSettings, cfg, inputs: dict[str, Any], out: Path, ctx) -> dict:
    """The stage's training on its Ray workers (tasks/machinery/ray_engine.py), the recipe's global batch split among them."""
    import uuid

    from tasks.machinery import ray_engine, tracking
    from tasks.machinery.context import is_transient

    s = ctx.env.ray
    training = ray_engine.per_worker_training(t, s["workers"])
    worker_cfg = cfg.model_copy(update={"training": training}) if getattr(cfg, "training", None) is t else cfg
    name = f"{ctx.cache_key or 'stage'}-{uuid.uuid4().hex[:8]}"
    scratch = ray_engine.scratch_folder(s, name)
    spec = {"function": function, "config": worker_cfg,
            "inputs": {k: v if isinstance(v, dict) else str(v) for k, v in inputs.items()}, "refs": ctx.refs,
            "seed": ctx.seed, "env": ctx.env.to_dict(), "run_id": ctx.run_id, "stage": ctx.stage,
            "cache_key": ctx.cache_key, "round": ctx.round, "trainer_output": str(scratch / "trainer")}
    if ctx.run_id:
        tracking.set_tags(ctx.env.tracking_uri, ctx.run_id, {"posttrain.ray.train_run": name,
                                                             "posttrain.ray.workers": str(s["workers"])})
    logger.info("[%s] training on %d Ray workers, global batch %d = %d per worker", ctx.stage, s["workers"],
                t.batch_size * t.processes, training.batch_size)
    try:
        return ray_engine.train(_ray_rank, spec, s, ctx.env.storage_root, name, out, is_transient, ctx.stage)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _ray_rank(spec: dict) -> tuple[dict, Path]:
    """One rank on a Ray worker: the inputs on this node (from the store when the driver's folder is not
    here), the stage context, the training function; returns its metrics and output folder."""
    from tasks.machinery.context import RunEnv, materialize_input
    from tasks.machinery.store import ArtifactStore

    env = RunEnv(**spec["env"])
    store = ArtifactStore(env.storage_root)
    inputs = {}
    for slot, value in spec["inputs"].items():
        if isinstance(value, str) and not Path(value).exists() and slot in spec["refs"]:
            value = materialize_input(store, spec["refs"][slot], env.tracking_uri)
        inputs[slot] = Path(value) if isinstance(value, str) and Path(value).exists() else value
    ctx = _rank_context(spec, env)
    out = Path(tempfile.mkdtemp(prefix="posttrain-ray-out-"))
    metrics = spec["function"](spec["config"], inputs, out, ctx)
    ctx.flush()
    return metrics, out


def _rank_context(spec: dict, env):
    """The stage context one rank trains with (only the main rank logs), and the trainer folder all ranks share:
    each writes its own RNG state into the same checkpoint."""
    from tasks.machinery.context import StageContext

    os.environ[TRAINER_OUTPUT_ENV] = spec["trainer_output"]
    return StageContext(seed=spec["seed"], env=env, run_id=spec["run_id"] if is_main_process() else None,
                        stage=spec["stage"], cache_key=spec["cache_key"], round=spec["round"], refs=spec["refs"])


def _launch_failure(t: TrainingSettings, code: int, scratch: Path) -> RankFailed:
    """Which rank failed first and why, from the error file each failing rank writes."""
    errors = sorted((json.loads(p.read_text()) for p in scratch.glob("rank-*.error.json")), key=lambda e: e["time"])
    if not errors:
        return RankFailed(f"{t.launcher} with {t.processes} processes failed (exit {code}); no rank reported an "
                          "error (killed by a signal, or out of memory?)")
    first = errors[0]
    others = f"; ranks {', '.join(str(e['rank']) for e in errors[1:])} failed after it" if len(errors) > 1 else ""
    cls = TransientRankFailure if first["transient"] else RankFailed
    return cls(f"rank {first['rank']} of {t.processes} ({t.launcher}) failed: {first['error']}{others}")


def _function(target: str):
    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def main(spec_path: str) -> None:
    import time

    from tasks.machinery.context import RunEnv, is_transient

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        ctx = _rank_context(spec, RunEnv(**spec["env"]) if spec["env"] else None)
        inputs = {k: Path(v) if isinstance(v, str) and Path(v).exists() else v for k, v in spec["inputs"].items()}
        cfg = _function(spec["config_class"]).model_validate(spec["config"])
        metrics = _function(spec["target"])(cfg, inputs, Path(spec["out"]), ctx)
        ctx.flush()
    except BaseException as exc:
        (Path(spec["errors"]) / f"rank-{rank}.error.json").write_text(json.dumps({
            "rank": rank, "time": time.time(), "error": f"{type(exc).__name__}: {exc}", "transient": is_transient(exc),
        }))
        raise
    if is_main_process():
        Path(spec["metrics_path"]).write_text(json.dumps(metrics))


if __name__ == "__main__":
    main(sys.argv[1])
