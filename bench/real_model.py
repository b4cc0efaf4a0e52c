"""Speed on a real model, side by side: the SFT and DPO stages of configs/smollm2-word-problems.yaml against a
bare TRL script with the same model, rows, template, hyperparameters and seed.

    python tools/fetch_smollm2.py && python bench/real_model.py [--runs 3] [--sft-steps 30] [--dpo-steps 20]

Per round, in a fresh state folder: the data stage and the GGUF conversion first (not timed), then
`posttrain run --only sft` and `--only dpo` (the stage's seconds as the pipeline reports them: input
verification, training, the held-out loss, saving, committing, MLflow logging) and bench/bare_trl_real_model.py
for each (model load, training, saving). Prints tokens/s (tokens trained / stage seconds), the peak RSS of each
process and the ratio stage/bare per stage; medians over rounds. Writes bench/results/real_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ENV, ROOT, stop_server

RECIPE = "configs/smollm2-word-problems.yaml"


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command, from its own resource usage (os.wait4)."""
    started = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed; see {log}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def stage(home: Path, name: str, overrides: list[str]) -> dict:
    env = {**ENV, "POSTTRAIN_HOME": str(home)}
    summary = home / f"{name}.json"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", RECIPE, "--only", name, "--summary-json",
           str(summary)] + [a for o in overrides for a in ("--set", o)]
    wall, rss = run(cmd, env, home / f"{name}.log")
    found = next(s for s in json.loads(summary.read_text())["stages"] if s["name"] == name)
    return {"seconds": found["seconds"], "tokens": found["metrics"].get("train/tokens"), "peak_rss_mb": rss,
            "command_seconds": wall, "output": found["output_uri"], "timings": found.get("timings", {}),
            "trainer_seconds": found["metrics"].get("train/runtime_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "real_model.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    from fetch_smollm2 import fetch

    gguf_file = fetch()
    overrides = [f"sft.inputs.base={gguf_file}", f"sft.training.max_steps={args.sft_steps}",
                 f"dpo.training.max_steps={args.dpo_steps}"]
    work = Path(tempfile.mkdtemp(prefix="posttrain-real-model-"))
    print(f"work folder: {work}", flush=True)
    rounds = []
    for i in range(args.runs):
        home = work / f"round-{i}"
        home.mkdir()
        env = {**ENV, "POSTTRAIN_HOME": str(home)}
        try:
            stage(home, "data", overrides)
            convert = ("from tasks.machinery.modeling import resolve_model; from tasks.machinery.context import materialize_input; "
                       "from tasks.machinery.store import ArtifactStore; import sys; print(materialize_input(ArtifactStore("
                       f"'{home / 'artifacts'}'), resolve_model('{gguf_file}')))")
            folder = subprocess.run([sys.executable, "-c", convert], env=env, cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip().splitlines()[-1]
            data = next((home / "artifacts" / "prepare_data").glob("*/attempt-*"))
            result = {}
            for name, steps in (("sft", args.sft_steps), ("dpo", args.dpo_steps)):
                staged = stage(home, name, overrides)
                bare_json = home / f"bare-{name}.json"
                base = folder if name == "sft" else next((home / "artifacts" / "sft").glob("*/attempt-*"))
                _, bare_rss = run([sys.executable, "bench/bare_trl_real_model.py", name, "--data", str(data),
                                   "--model", str(base), "--out", str(home / f"bare-{name}"), "--steps", str(steps),
                                   "--json", str(bare_json)], env, home / f"bare-{name}.log")
                bare = json.loads(bare_json.read_text())
                result[name] = {"stage": staged, "bare": {**bare, "peak_rss_mb": bare_rss}}
                print(f"round {i + 1} {name}: stage {staged['seconds']:.1f} s ({staged['tokens'] / staged['seconds']:.0f}"
                      f" tok/s, {staged['peak_rss_mb']:.0f} MB), bare {bare['seconds']:.1f} s "
                      f"({bare['tokens'] / bare['seconds']:.0f} tok/s, {bare_rss:.0f} MB), ratio "
                      f"{staged['seconds'] / bare['seconds']:.3f}", flush=True)
                t = staged["timings"]
                if t:
                    print(f"  stage seconds: setup {t.get('setup', 0):.1f}, inputs {t.get('inputs', 0):.1f}, work "
                          f"{t.get('work', 0):.1f} (trainer.train {staged['trainer_seconds'] or 0:.1f}), commit "
                          f"{t.get('commit', 0):.1f}, the rest {staged['seconds'] - sum(t.values()):.1f}", flush=True)
            rounds.append(result)
        finally:
            stop_server(home)

    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1 -> fp32), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads default; medians of {len(rounds)} rounds")
    print(f"{'stage':6} {'steps':>5} {'tokens':>7} {'stage s':>8} {'bare s':>7} {'stage tok/s':>11} "
          f"{'bare tok/s':>10} {'stage RSS MB':>12} {'bare RSS MB':>11} {'stage/bare':>10}")
    table = {}
    for name, steps in (("sft", args.sft_steps), ("dpo", args.dpo_steps)):
        med = lambda f: statistics.median(f(r[name]) for r in rounds)  # noqa: E731
        row = {"steps": steps, "tokens": med(lambda r: r["stage"]["tokens"]),
               "stage_seconds": med(lambda r: r["stage"]["seconds"]), "bare_seconds": med(lambda r: r["bare"]["seconds"]),
               "stage_tokens_per_second": med(lambda r: r["stage"]["tokens"] / r["stage"]["seconds"]),
               "bare_tokens_per_second": med(lambda r: r["bare"]["tokens"] / r["bare"]["seconds"]),
               "stage_peak_rss_mb": med(lambda r: r["stage"]["peak_rss_mb"]),
               "bare_peak_rss_mb": med(lambda r: r["bare"]["peak_rss_mb"]),
               "ratio": med(lambda r: r["stage"]["seconds"] / r["bare"]["seconds"])}
        table[name] = row
        print(f"{name:6} {steps:>5} {row['tokens']:>7.0f} {row['stage_seconds']:>8.1f} {row['bare_seconds']:>7.1f} "
              f"{row['stage_tokens_per_second']:>11.0f} {row['bare_tokens_per_second']:>10.0f} "
              f"{row['stage_peak_rss_mb']:>12.0f} {row['bare_peak_rss_mb']:>11.0f} {row['ratio']:>10.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"table": table, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
