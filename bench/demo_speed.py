"""Demo end to end, per stage, against TRL's own CLI on the same data and hyperparameters.

    python bench/demo_speed.py [--runs 3] [--trl-runs 3] [--json bench/results/demo_speed.json]

1. `posttrain run` (configs/demo.yaml, DPO) --runs times, each in a fresh state folder: wall time of
   the whole command and each stage's seconds; medians reported.
2. `posttrain run --config configs/demo-rlhf.yaml` once on the first state folder (only align, evaluate and promote run).
3. `trl sft` and `trl dpo` --trl-runs times on the prepared data, base model and SFT model of run 1,
   with the recipe's hyperparameters. The overhead ratio is our stage's seconds over TRL's process wall
   time; and, stricter, over TRL's wall time less its start-up (`trl sft --help`: interpreter and
   library imports), which our stages do not pay since the flow process has imported them already.
   Both sides' training-loop time (`train_runtime`) is printed too.
4. The learning table (deterministic on CPU: equal in every run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.config import load_config  # noqa: E402

from common import ENV, posttrain_run, stop_server, timed  # noqa: E402


def posttrain(home: Path, config: str | None = None) -> tuple[float, dict]:
    return posttrain_run(home, f"summary-{len(list(home.glob('summary-*.json')))}", config=config)


def attempt_dir(summary: dict, stage: str) -> str:
    uri = next(s["output_uri"] for s in summary["stages"] if s["name"] == stage)
    manifest = json.loads((Path(uri) / "MANIFEST.json").read_text())
    return str(Path(uri) / manifest["attempt"])


def common_flags(t, out: Path) -> list[str]:
    flags = ["--output_dir", str(out), "--learning_rate", str(t.learning_rate),
             "--per_device_train_batch_size", str(t.batch_size), "--max_length", str(t.max_length),
             "--use_cpu", "--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none",
             "--save_strategy", "no", "--eval_strategy", "no", "--seed", "0", "--data_seed", "0",
             "--logging_steps", str(t.logging_steps), "--dataset_train_split", "train",
             "--lr_scheduler_type", t.lr_scheduler, "--weight_decay", str(t.weight_decay)]
    return flags + (["--max_steps", str(t.max_steps)] if t.max_steps > 0 else ["--num_train_epochs", str(t.epochs)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trl-runs", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "demo_speed.json"))
    args = parser.parse_args()
    cfg = load_config()
    work = Path(tempfile.mkdtemp(prefix="posttrain-bench-"))
    print(f"work folder: {work}", flush=True)

    walls, stage_seconds, summaries = [], {}, []
    for i in range(args.runs):
        home = work / f"run-{i}"
        home.mkdir()
        wall, summary = posttrain(home)
        walls.append(wall)
        summaries.append(summary)
        for s in summary["stages"]:
            stage_seconds.setdefault(s["name"], []).append(s["seconds"])
        print(f"run {i + 1}: {wall:.1f} s end to end", flush=True)
    rlhf_wall, rlhf = posttrain(work / "run-0", "configs/demo-rlhf.yaml")
    for i in range(args.runs):
        stop_server(work / f"run-{i}")
    print(f"rlhf variant (align, evaluate and promote rerun): {rlhf_wall:.1f} s", flush=True)

    first = summaries[0]
    data, base, sft = attempt_dir(first, "prepare_data"), attempt_dir(first, "pretrain"), attempt_dir(first, "sft")
    startup = [timed(["trl", "sft", "--help"], ENV, work / "startup.log") for _ in range(args.trl_runs)]
    trl_sft, trl_dpo = [], []
    for i in range(args.trl_runs):
        t = cfg.stages["sft"].training
        trl_sft.append(timed(["trl", "sft", "--model_name_or_path", base, "--dataset_name", f"{data}/sft",
                              *common_flags(t, work / "trl-sft")], ENV, work / f"trl-sft-{i}.log"))
        t = cfg.stages["align"].training
        trl_dpo.append(timed(["trl", "dpo", "--model_name_or_path", sft, "--dataset_name", f"{data}/preference",
                              "--beta", str(cfg.stages["align"].beta), "--loss_type", *cfg.stages["align"].loss_type,
                              *common_flags(t, work / "trl-dpo")], ENV, work / f"trl-dpo-{i}.log"))
        print(f"trl run {i + 1}: sft {trl_sft[-1]:.1f} s, dpo {trl_dpo[-1]:.1f} s", flush=True)

    med = statistics.median

    def loop_seconds(logs: list[Path]) -> float:
        import re

        found = [float(m) for log in logs for m in re.findall(r"'train_runtime': '([0-9.]+)'", log.read_text())]
        return med(found) if found else float("nan")

    def our_loop(stage: str) -> float:
        return med(next(s["metrics"].get("train/runtime_seconds", float("nan")) for s in sm["stages"]
                        if s["name"] == stage) for sm in summaries)
    report = {
        "runs": args.runs,
        "end_to_end_seconds": {"median": med(walls), "all": walls},
        "stage_seconds_median": {k: med(v) for k, v in stage_seconds.items()},
        "rlhf_variant_seconds": rlhf_wall,
        "rlhf_align_seconds": next(s["seconds"] for s in rlhf["stages"] if s["name"] == "align"),
        "trl_cli": {"startup_seconds": med(startup), "sft_seconds": med(trl_sft), "dpo_seconds": med(trl_dpo),
                    "sft_train_runtime": loop_seconds(sorted(work.glob("trl-sft-*.log"))),
                    "dpo_train_runtime": loop_seconds(sorted(work.glob("trl-dpo-*.log")))},
        "ours_train_runtime": {"sft": our_loop("sft"), "dpo": our_loop("align")},
        "metrics_dpo": first["metrics"],
        "metrics_rlhf": rlhf["metrics"],
    }
    ours_sft, ours_dpo = report["stage_seconds_median"]["sft"], report["stage_seconds_median"]["align"]
    report["overhead_ratio"] = {
        "sft_vs_trl_wall": ours_sft / med(trl_sft),
        "dpo_vs_trl_wall": ours_dpo / med(trl_dpo),
        "sft_vs_trl_minus_startup": ours_sft / (med(trl_sft) - med(startup)),
        "dpo_vs_trl_minus_startup": ours_dpo / (med(trl_dpo) - med(startup)),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))

    print(f"\nend to end (median of {args.runs}): {med(walls):.1f} s   all: {', '.join(f'{w:.1f}' for w in walls)}")
    print("per stage (median seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in report["stage_seconds_median"].items()))
    print(f"rlhf variant: {rlhf_wall:.1f} s end to end with cached upstream; align {report['rlhf_align_seconds']:.1f} s")
    print(f"TRL CLI (median of {args.trl_runs}): start-up {med(startup):.1f} s, sft {med(trl_sft):.1f} s, "
          f"dpo {med(trl_dpo):.1f} s")
    print(f"training loop only (train_runtime): sft ours {report['ours_train_runtime']['sft']:.1f} s vs TRL "
          f"{report['trl_cli']['sft_train_runtime']:.1f} s; dpo ours {report['ours_train_runtime']['dpo']:.1f} s vs "
          f"TRL {report['trl_cli']['dpo_train_runtime']:.1f} s")
    for k, v in report["overhead_ratio"].items():
        print(f"overhead ratio {k}: {v:.3f}")
    print("\n| metric | dpo | rlhf |\n|---|---|---|")
    for key in ("eval/base/task_accuracy", "eval/sft/task_accuracy", "reward/pairwise_accuracy", "eval/policy/task_accuracy",
                "eval/policy/win_rate_vs_sft", "eval/policy/kl_to_sft", "eval/policy/mean_reward", "eval/sft/mean_reward"):
        print(f"| {key} | {first['metrics'].get(key, float('nan')):.3f} | {rlhf['metrics'].get(key, float('nan')):.3f} |")


if __name__ == "__main__":
    main()
