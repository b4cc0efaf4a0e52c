"""SFT on 1, 2 and 4 Ray Train workers on this machine, and the in-process stage, on the same data, model and
global batch (each of N workers takes 1/N of it).

    python bench/ray_scaling.py [--workers 1 2 4] [--steps 60] [--runs 3] [--cpus 2]

Prints one line per run, then medians: wall seconds of run_training (for Ray: the launch of the controller
and the workers, the process group, training, and the output's way back through Ray Train's storage),
the trainer's own seconds, samples/s (steps x global batch / trainer seconds), the scaling efficiency
(samples/s at N / (N x samples/s at 1 worker)) and the launch overhead (wall seconds on 1 Ray worker /
wall seconds in process). A local Ray runtime with --cpus logical CPUs is started once; workers reserve
cpus/max(workers) each, so 4 workers on 2 cores share them (the figure says what oversubscription costs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prepare(root: Path):
    from flows.config import instance_settings, load_config
    from tasks.machinery import synthetic
    from tasks.kinds.prepare_data import prepare_data
    from tasks.kinds.pretrain import pretrain
    from tasks.kinds.sft import SFTStageConfig

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    (root / "data").mkdir()
    prepare_data(cfg.stages["prepare_data"], root / "data", seed=0)
    base = cfg.stages["pretrain"].model_copy(update={"hidden_size": 256, "intermediate_size": 1024, "layers": 4})
    (root / "base").mkdir()
    pretrain(base, [r["text"] for r in synthetic.generate("corpus", corpus_size=400)], root / "base", seed=0)
    return SFTStageConfig.model_validate(instance_settings(cfg.stages["sft"]))


def run(config, root: Path, name: str, ray: dict | None) -> dict:
    from tasks.machinery.launch import run_training
    from tasks.kinds.sft import _train
    from tasks.machinery.context import RunEnv, StageContext

    env = RunEnv(storage_root=str(root / "store"), tracking_uri="unused", experiment_id="0",
                 parent_run_id="unused", ray=ray) if ray else None
    out = root / name
    out.mkdir()
    started = time.perf_counter()
    metrics = run_training(_train, config.training, config, {"data": root / "data", "base": root / "base"}, out,
                           StageContext(seed=0, env=env, run_id=None, stage="sft", cache_key=name))
    return {"wall": time.perf_counter() - started, "train": metrics["train/runtime_seconds"],
            "processes": metrics["train/processes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16, help="global batch (divisible by every worker count)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 2))
    args = parser.parse_args()
    import ray
    import torch

    from tasks.machinery import hardware

    root = Path(tempfile.mkdtemp(prefix="posttrain-bench-ray-"))
    config = prepare(root)
    config.training.max_steps, config.training.batch_size, config.training.processes = args.steps, args.batch, 1
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    per_worker_cpus = args.cpus / max(args.workers)
    print(f"machine: {hardware.describe()['cpu_model']} x {hardware.describe()['cpu_count']} torch {torch.__version__} ray {ray.__version__}; "
          f"SFT {args.steps} steps, global batch {args.batch}, model hidden 256 x 4 layers; "
          f"{per_worker_cpus:g} CPUs per Ray worker")
    results: dict[str, list[dict]] = {}
    for r in range(args.runs):
        for label, ray_settings in [("in-process", None)] + [
                (f"ray x{n}", {"address": None, "workers": n, "cpus_per_worker": per_worker_cpus,
                               "gpus_per_worker": 0.0, "max_failures": 0}) for n in args.workers]:
            result = run(config, root, f"{label.replace(' ', '')}-{r}", ray_settings)
            results.setdefault(label, []).append(result)
            samples = args.steps * args.batch / result["train"]
            print(f"run {r} {label:>10}: wall {result['wall']:.1f} s, trainer {result['train']:.1f} s, "
                  f"{samples:.0f} samples/s, processes {result['processes']:.0f}", flush=True)
    print("\nmedians:")
    median = {label: {k: statistics.median(x[k] for x in rs) for k in ("wall", "train")} for label, rs in results.items()}
    one = args.steps * args.batch / median[f"ray x{min(args.workers)}"]["train"] if f"ray x{min(args.workers)}" in median else None
    for label, m in median.items():
        samples = args.steps * args.batch / m["train"]
        workers = int(label.split("x")[1]) if label.startswith("ray") else 1
        efficiency = f", efficiency {samples / (workers * one):.2f}" if one and label.startswith("ray") else ""
        print(f"  {label:>10}: wall {m['wall']:.1f} s, trainer {m['train']:.1f} s, {samples:.0f} samples/s{efficiency}")
    if "ray x1" in median:
        print(f"  launch overhead: ray x1 wall / in-process wall = {median['ray x1']['wall'] / median['in-process']['wall']:.2f}"
              f" (+{median['ray x1']['wall'] - median['in-process']['wall']:.1f} s)")
    ray.shutdown()


if __name__ == "__main__":
    main()
