"""The demo's learning table per seed: does every stage learn, on every seed, with margins?

    python bench/learning.py [--seeds 0 1 2] [--threads 1] [--parallel 2] [--json bench/results/learning.json]

For each seed: `posttrain run --set seed=N` (the demo with DPO), then the same with
`configs/demo-rlhf.yaml` in the same state folder (data, base model, SFT and reward model come from cache).
Prints, per seed and as mean and min over seeds: base, SFT, reward-model pairwise accuracy, DPO and
RLHF task accuracy on the held-out prompts, and the margins the project holds itself to:

    sft >= base + 0.3    reward pairwise accuracy >= 0.9    dpo >= sft + 0.05    rlhf >= sft + 0.05

CPU results are bit-exact only for one machine and thread count; other CPUs and thread counts move
them like another seed does (`--threads` shows the thread-count part). Seeds run `--parallel` at a
time, each with `--threads` math threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, posttrain_run, stop_server

THRESHOLDS = (  # (name, value(row), bound(row), description)
    ("sft_vs_base", lambda r: r["sft"] - r["base"], 0.3, "sft - base >= 0.3"),
    ("reward_accuracy", lambda r: r["reward"], 0.9, "reward pairwise accuracy >= 0.9"),
    ("dpo_vs_sft", lambda r: r["dpo"] - r["sft"], 0.05, "dpo - sft >= 0.05"),
    ("rlhf_vs_sft", lambda r: r["rlhf"] - r["sft"], 0.05, "rlhf - sft >= 0.05"),
)


def one_seed(work: Path, seed: int, threads: int) -> dict:
    home = work / f"seed-{seed}"
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {"OMP_NUM_THREADS": str(threads)}
    try:
        dpo = posttrain_run(home, "dpo", f"seed={seed}", env=env)[1]["metrics"]
        rlhf = posttrain_run(home, "rlhf", f"seed={seed}", env=env, config="configs/demo-rlhf.yaml")[1]["metrics"]
    finally:
        stop_server(home)
    row = {"seed": seed, "threads": threads, "base": dpo["eval/base/task_accuracy"], "sft": dpo["eval/sft/task_accuracy"],
           "reward": dpo["reward/pairwise_accuracy"], "dpo": dpo["eval/policy/task_accuracy"],
           "rlhf": rlhf["eval/policy/task_accuracy"], "rlhf_win_rate_vs_sft": rlhf["eval/policy/win_rate_vs_sft"],
           "rlhf_kl_to_sft": rlhf["eval/policy/kl_to_sft"], "seconds": round(time.monotonic() - started, 1)}
    print(f"seed {seed}: done in {row['seconds']:.0f} s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--parallel", type=int, default=2, help="seeds run at the same time")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "learning.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="posttrain-learning-"))
    print(f"work folder: {work}", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda s: one_seed(work, s, args.threads), args.seeds))

    columns = ("base", "sft", "reward", "dpo", "rlhf")
    print(f"\n| seed | {' | '.join(columns)} | dpo - sft | rlhf - sft |")
    print("|---" * (len(columns) + 3) + "|")
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join(f"{r[c]:.3f}" for c in columns)
              + f" | {r['dpo'] - r['sft']:+.3f} | {r['rlhf'] - r['sft']:+.3f} |")
    for name, agg in (("mean", statistics.mean), ("min", min)):
        print(f"| {name} | " + " | ".join(f"{agg(r[c] for r in rows):.3f}" for c in columns)
              + f" | {agg(r['dpo'] - r['sft'] for r in rows):+.3f} | {agg(r['rlhf'] - r['sft'] for r in rows):+.3f} |")
    print(f"\n({args.threads} math thread(s) per run)")
    failed = []
    for name, value, bound, text in THRESHOLDS:
        worst = min(value(r) for r in rows)
        ok = worst >= bound
        failed += [] if ok else [name]
        print(f"{'PASS' if ok else 'FAIL'}  {text}: worst over seeds {worst:.3f} (margin {worst - bound:+.3f})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "threads": args.threads, "failed": failed}, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
