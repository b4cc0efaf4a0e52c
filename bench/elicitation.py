"""Sample efficiency of feedback elicitation: reward-model accuracy and policy win rate against the number of
preference labels asked for, per selection rule, on seeds 0-2.

    python bench/elicitation.py [--seeds 0 1 2] [--rules passive boltzmann infomax double_ts] [--rounds 16]
                                [--parallel 2] [--json bench/results/elicitation.json]

For each seed, `posttrain run --config configs/elicit.yaml` up to the elicit stage, once per rule (the data,
base, SFT and seed reward model come from cache after the first rule). Each round's numbers come from the run
summary; each round's MLflow run holds the curve so far with the number of queries as step. Prints one line
per rule and query count (mean over seeds, lowest and highest seed in brackets):

    rule=R queries=N rm_accuracy=A win_rate=W

with how many queries were decided (not ties), then the number of queries double_ts needs to reach passive's
final quality, and the headroom: the accuracy the
same ensemble reaches on the features with every careful-grader pair (about 5,000) as labels, and the win rate of
best-of-K picked by the ground truth. The bench's own MLflow experiment `elicitation-bench` (under the work
folder) gets a run per rule with the mean curves (step = queries) and the figure sample_efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, posttrain_run, stop_server

sys.path.insert(0, str(ROOT))
RULES = ("passive", "boltzmann", "infomax", "double_ts")
MEASURES = ("rm_accuracy", "win_rate", "oracle_win_rate", "decided")
UPSTREAM = ("data", "seed_data", "base", "sft", "seed_reward", "elicit")


def one_seed(work: Path, seed: int, rules: list[str], rounds: int) -> dict:
    home = work / f"seed-{seed}"
    home.mkdir(parents=True, exist_ok=True)
    found: dict = {"curves": {}}
    try:
        for rule in rules:
            only = [a for stage in UPSTREAM for a in ("--only", stage)]
            _, summary = posttrain_run(home, f"{rule}", f"seed={seed}", f"stages.elicit.rule={rule}",
                                       f"stages.elicit.rounds={rounds}", config="configs/elicit.yaml", extra=only)
            metrics = summary["metrics"]
            found["curves"][rule] = [
                {"queries": int(metrics[f"elicit.round{k}/elicit/queries"]),
                 **{m: metrics[f"elicit.round{k}/elicit/{m}"] for m in MEASURES}} for k in range(1, rounds + 1)]
            print(f"seed {seed} {rule}: " + ", ".join(f"{m} {found['curves'][rule][-1][m]:.3f}" for m in MEASURES),
                  flush=True)
        found["outputs"] = {s["name"]: (s["output_uri"], s["output_digest"]) for s in summary["stages"]
                            if s["name"] in ("data", "seed_reward")}
        found["storage_root"] = summary["storage_root"]
    finally:
        stop_server(home)
    return found


def ceiling(found: dict, seed: int) -> float:
    """Held-out accuracy of the ensemble on the same frozen features when every careful-grader pair is a label:
    what the features can hold at most."""
    from flows.config import load_config
    from tasks.machinery.splits import load_split
    from tasks.blocks.elicitation import Ensemble, Features
    from tasks.machinery.store import ArtifactStore, Ref

    store = ArtifactStore(found["storage_root"])
    data, features_model = (store.materialize(Ref(*found["outputs"][name])) for name in ("data", "seed_reward"))

    cfg = load_config(ROOT / "configs" / "elicit.yaml").stages["elicit"]
    features = Features.load(features_model, False, 256, True)
    held = load_split(Path(data), "preference", "eval").select(range(cfg.eval_pairs))
    train = load_split(Path(data), "preference", "train")

    def encode(rows):
        prompts = list(rows["prompt"])
        return (features(prompts, [c[-1]["content"] for c in rows["chosen"]]),
                features(prompts, [r[-1]["content"] for r in rows["rejected"]]))

    held_chosen, held_rejected = encode(held)  # first: fixes the scaling, as the stage does
    chosen, rejected = encode(train)
    ensemble = Ensemble(cfg.ensemble, chosen.shape[1], seed)
    ensemble.fit(chosen, rejected, [1.0] * len(train))
    margin = ensemble.rewards(held_chosen).mean(0) - ensemble.rewards(held_rejected).mean(0)
    features.close()
    return float((margin > 0).float().mean())


def mean_curves(rows: list[dict], rules: list[str]) -> dict:
    """curves[measure][rule] = [(queries, mean, lowest, highest)] over seeds, by round."""
    curves: dict = {m: {} for m in MEASURES}
    for rule in rules:
        per_seed = [r["curves"][rule] for r in rows]
        for m in MEASURES:
            curves[m][rule] = [(round(statistics.mean(p["queries"] for p in points)),
                                statistics.mean(p[m] for p in points), min(p[m] for p in points),
                                max(p[m] for p in points)) for points in zip(*per_seed)]
    return curves


def queries_to_reach(curve: list[tuple], target: float) -> int | None:
    return next((q for q, value, _, _ in curve if value >= target), None)


def log_to_mlflow(work: Path, curves: dict, figure: Path, summary: dict) -> str:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'bench-mlflow.db'}")
    mlflow.set_experiment("elicitation-bench")
    with mlflow.start_run(run_name="sample-efficiency") as parent:
        mlflow.log_artifact(str(figure))
        mlflow.log_dict(summary, "summary.json")
        for rule in curves["rm_accuracy"]:
            with mlflow.start_run(run_name=rule, nested=True):
                mlflow.set_tag("rule", rule)
                for m in MEASURES:
                    for queries, value, _, _ in curves[m][rule]:
                        mlflow.log_metric(m, value, step=queries)
    return parent.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=2, help="seeds run at the same time")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "elicitation.json"))
    parser.add_argument("--work", help="state folders to use (a rerun reuses every cached stage); default: a new one")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="posttrain-elicitation-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda s: one_seed(work, s, args.rules, args.rounds), args.seeds))
    for row, seed in zip(rows, args.seeds):  # in this thread: transformers' lazy imports are not thread-safe
        row["ceiling"] = ceiling(row, seed)

    curves = mean_curves(rows, args.rules)
    print()
    for rule in args.rules:
        for (q, acc, acc_lo, acc_hi), (_, win, win_lo, win_hi) in zip(curves["rm_accuracy"][rule],
                                                                       curves["win_rate"][rule]):
            print(f"rule={rule} queries={q} rm_accuracy={acc:.3f} win_rate={win:.3f}   "
                  f"[seeds: {acc_lo:.3f}-{acc_hi:.3f}, {win_lo:.3f}-{win_hi:.3f}]")
        print(f"rule={rule}: {curves['decided'][rule][-1][1]:.0f} of {curves['decided'][rule][-1][0]} queries decided "
              "(the rest were ties: both replies equally right or wrong)")
    summary: dict = {"seeds": args.seeds, "rounds": args.rounds, "final": {}, "double_ts_to_reach_passive": {}}
    for rule in args.rules:
        summary["final"][rule] = {m: curves[m][rule][-1][1] for m in MEASURES}
    if "passive" in args.rules and "double_ts" in args.rules:
        for m in ("rm_accuracy", "win_rate"):
            target = curves[m]["passive"][-1][1]
            reached = queries_to_reach(curves[m]["double_ts"], target)
            summary["double_ts_to_reach_passive"][m] = reached
            budget = curves[m]["passive"][-1][0]
            print(f"\n{m}: passive ends at {target:.3f} after {budget} queries; double_ts reaches it "
                  + (f"after {reached} queries ({reached / budget:.0%} of the budget)" if reached is not None
                     else "not within the budget"))
    summary["ceiling_rm_accuracy"] = statistics.mean(r["ceiling"] for r in rows)
    ceilings = ", ".join(f"{r['ceiling']:.3f}" for r in rows)
    summary["oracle_win_rate"] = curves["oracle_win_rate"][args.rules[0]][-1][1]
    print(f"\nheadroom: the ensemble on the same features with all ~5,000 careful-grader pairs as labels: "
          f"rm_accuracy {summary['ceiling_rm_accuracy']:.3f} (seeds {ceilings}); best-of-K picked by the ground "
          f"truth: win_rate {summary['oracle_win_rate']:.3f}")
    from tasks.machinery.figures import sample_efficiency

    figure = sample_efficiency({m: curves[m] for m in ("rm_accuracy", "win_rate")}, work,
                               f"Feedback elicitation on the demo task, seeds {', '.join(map(str, args.seeds))}")
    run_id = log_to_mlflow(work, curves, figure, summary)
    print(f"\nfigure: {figure}\nMLflow: experiment elicitation-bench, run {run_id} "
          f"(mlflow ui --backend-store-uri sqlite:///{work / 'bench-mlflow.db'})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "curves": curves, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
