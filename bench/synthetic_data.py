"""Synthetic data against the sloppy annotator, per seed: a fresh SFT of the base model on the demo policy's
verified answers (configs/synthesize.yaml) against the SFT on the sloppy demonstrations.

    python bench/synthetic_data.py [--seeds 0 1 2] [--parallel 2] [--json bench/results/synthetic_data.json]

Prints per seed the held-out task accuracy (95% bootstrap interval) of the SFT on sloppy data, the SFT on the
synthetic data and the teacher, the rows each SFT trained on, and the synthetic data's filter counts; then the
mean and the smallest gain over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, posttrain_run, stop_server

MODELS = ("sft", "sft_synth", "teacher")


def one_seed(work: Path, seed: int) -> dict:
    home = work / f"seed-{seed}"
    home.mkdir(parents=True, exist_ok=True)
    try:
        _, summary = posttrain_run(home, "synthesize", f"seed={seed}", config="configs/synthesize.yaml")
    finally:
        stop_server(home)
    m = summary["metrics"]
    row = {"seed": seed, **{f"{name}{part}": m[f"eval/{name}/task_accuracy{part}"] for name in MODELS
                            for part in ("", "_ci_low", "_ci_high")},
           "sloppy_rows": m["data/sft/train_rows"], "synthetic_rows": m["synth/sft/train_rows"],
           **{k.removeprefix("synth/"): v for k, v in m.items() if k.startswith("synth/synthesize/")}}
    print(f"seed {seed}: sft {row['sft']:.3f}, sft_synth {row['sft_synth']:.3f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "synthetic_data.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="posttrain-synthetic-"))
    print(f"work folder: {work}", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda s: one_seed(work, s), args.seeds))
    print("\n| seed | SFT on sloppy data | SFT on synthetic data | teacher (DPO) | rows sloppy / synthetic | "
          "synthetic kept of generated |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda name: f"{r[name]:.3f} [{r[name + '_ci_low']:.3f}, {r[name + '_ci_high']:.3f}]"  # noqa: E731
        print(f"| {r['seed']} | {cell('sft')} | {cell('sft_synth')} | {cell('teacher')} | "
              f"{r['sloppy_rows']:.0f} / {r['synthetic_rows']:.0f} | "
              f"{r['synthesize/kept']:.0f} of {r['synthesize/generated']:.0f} |")
    gains = [r["sft_synth"] - r["sft"] for r in rows]
    print(f"\ngain of synthetic over sloppy SFT: mean {statistics.mean(gains):+.3f}, smallest {min(gains):+.3f}; "
          f"intervals apart on {sum(r['sft_synth_ci_low'] > r['sft_ci_high'] for r in rows)} of {len(rows)} seeds")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
