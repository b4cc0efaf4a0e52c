"""What a run costs outside its stages: the demo's wall time against the sum of its stages and against a
bare script that runs the same trainers in one process.

    python bench/overhead.py [--runs 3] [--json bench/results/overhead.json]

Per round, in a fresh state folder:
  1. `posttrain run` (the demo, DPO): the first run of a state folder, which also starts the folder's
     local Prefect server and creates its MLflow store;
  2. `posttrain run --set seed=1`: every stage recomputes, with the server and store already there
     (the steady state of someone iterating on a recipe);
  3. `posttrain run --set seed=1` again: every stage cached;
  4. `python bench/bare_demo.py`: the same stages as plain function calls in one process (no Prefect,
     no MLflow, no artifact store), with its own wall time and per-stage seconds.
"Outside stages" = wall time of the command - the sum of the stage seconds it reports. Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import ENV, posttrain_run, stop_server, timed


def posttrain(home: Path, name: str, *overrides: str) -> dict:
    wall, summary = posttrain_run(home, name, *overrides)
    stages = {s["name"]: s["seconds"] for s in summary["stages"]}
    return {"wall": wall, "stages": sum(stages.values()), "outside": wall - sum(stages.values()), "per_stage": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "overhead.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="posttrain-overhead-"))
    print(f"work folder: {work}", flush=True)
    rounds = []
    for i in range(args.runs):
        home = work / f"round-{i}"
        home.mkdir()
        try:
            first = posttrain(home, "first")
            steady = posttrain(home, "steady", "seed=1")
            cached = posttrain(home, "cached", "seed=1")
        finally:
            stop_server(home)
        bare_json = home / "bare.json"
        bare_wall = timed([sys.executable, "bench/bare_demo.py", "--out", str(home / "bare"), "--json", str(bare_json)],
                          ENV, home / "bare.log")
        bare = json.loads(bare_json.read_text())
        rounds.append({"first": first, "steady": steady, "cached": cached,
                       "bare": {"wall": bare_wall, "stages": sum(bare["stages"].values()), "per_stage": bare["stages"],
                                "imports": bare["imports"]}})
        print(f"round {i + 1}: first {first['wall']:.1f} s (outside stages {first['outside']:.1f}), steady "
              f"{steady['wall']:.1f} s (outside {steady['outside']:.1f}), cached {cached['wall']:.1f} s, "
              f"bare script {bare_wall:.1f} s", flush=True)

    med = statistics.median
    print(f"\nmedians of {args.runs} rounds (seconds):")
    print("| run | wall | sum of stages | outside stages |\n|---|---|---|---|")
    for kind in ("first", "steady", "cached"):
        print(f"| posttrain run, {kind} | {med(r[kind]['wall'] for r in rounds):.1f} | "
              f"{med(r[kind]['stages'] for r in rounds):.1f} | {med(r[kind]['outside'] for r in rounds):.1f} |")
    print(f"| bare script (same trainers, one process) | {med(r['bare']['wall'] for r in rounds):.1f} | "
          f"{med(r['bare']['stages'] for r in rounds):.1f} | {med(r['bare']['wall'] - r['bare']['stages'] for r in rounds):.1f} |")
    print("\nper stage, steady posttrain run vs bare script (median seconds):")
    for stage in rounds[0]["steady"]["per_stage"]:
        ours = med(r["steady"]["per_stage"][stage] for r in rounds)
        bare = med(r["bare"]["per_stage"].get(stage, float("nan")) for r in rounds)
        print(f"  {stage:13s} {ours:6.1f}  vs  {bare:6.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
