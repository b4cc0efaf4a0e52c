"""The headline of a pipeline run, first on its MLflow parent run and in its Prefect report: every model an
evaluation scored, side by side with the confidence intervals (a table artifact and the run's description),
the evaluation's figures, and a panel of each training stage's curves."""

from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path

from tasks.machinery import tracking

COLUMNS = ("task_accuracy", "task_accuracy_delta_vs_*", "mean_reward", "judge_score", "win_rate_vs_*", "kl_to_*",
           "response_tokens")
CURVES = ("train/loss", "eval/loss", "train/reward")  # what a training stage's panel shows, where it logged it


def with_interval(metrics: dict[str, float], key: str) -> str:
    """'0.620 [0.540, 0.700]': a number and its bootstrap interval, where the evaluation gave one."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return f"{metrics[key]:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")


def comparison_rows(metrics: dict[str, float]) -> list[dict[str, str]]:
    """One row per evaluated model: each headline number with its interval, e.g. '0.620 [0.540, 0.700]'."""
    models = [k.split("/")[0] for k in metrics if k.endswith("/response_tokens") and k.count("/") == 1]
    rows = []
    for model in models:
        row = {"model": model}
        for column in COLUMNS:
            for key in sorted(k for k in metrics if k.startswith(f"{model}/")):
                metric = key[len(model) + 1:]
                if "/" in metric or metric.endswith(("_ci_low", "_ci_high")) or not fnmatch.fnmatchcase(metric, column):
                    continue
                row[metric] = with_interval(metrics, key)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "—") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _origin_run(client, run_id: str):
    """The run that computed a stage (a cached stage's run in this pipeline points at it)."""
    run = client.get_run(run_id)
    origin = run.data.tags.get(tracking.TAG_CACHED_FROM)
    return client.get_run(origin) if origin else run


def training_curves(tracking_uri: str, stages: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    from tasks.machinery.stagekind import MODEL_OUTPUTS
    from tasks.kinds import kinds

    client = tracking.client(tracking_uri)
    curves = {}
    for stage in stages:
        kind = kinds().get(stage.get("kind", ""))
        if kind is None or kind.output not in MODEL_OUTPUTS or not stage.get("mlflow_run_id"):
            continue
        run = _origin_run(client, stage["mlflow_run_id"])
        found = {}
        for name in (c for c in CURVES if c in run.data.metrics):
            history = client.get_metric_history(run.info.run_id, name)
            if len(history) > 1:
                found[name] = sorted((h.step, h.value) for h in history)
        curves[stage["name"]] = found
    return curves


def attach_datasets(tracking_uri: str, run_id: str, stages: list[dict]) -> None:
    """Give the parent run the dataset inputs its data and evaluation stages recorded (the prepared splits,
    the held-out prompts), so the run's page names the data it was made from."""
    client = tracking.client(tracking_uri)
    runs = [_origin_run(client, s["mlflow_run_id"]).info.run_id for s in stages
            if s.get("kind") in ("prepare_data", "evaluate") and s.get("mlflow_run_id")]
    tracking.copy_dataset_inputs(tracking_uri, runs, run_id)


def decisions(tracking_uri: str, stages: list[dict]) -> list[str]:
    """What each promote stage decided, in a line: the version, its alias and the gate's reasons."""
    client = tracking.client(tracking_uri)
    lines = []
    for stage in stages:
        if stage.get("kind") == "promote" and stage.get("mlflow_run_id"):
            tags = _origin_run(client, stage["mlflow_run_id"]).data.tags
            if "posttrain.promote.model" in tags:
                lines.append(f"**Promotion** ({stage['name']}): {tags['posttrain.promote.model']} is "
                             f"**@{tags['posttrain.promote.alias']}**: {tags.get('posttrain.gate.reasons', '')}")
    return lines


def ranking(metrics: dict[str, float], metric: str = "task_accuracy") -> str:
    """The models by the primary metric, best first, each with its interval: the comparison in one line."""
    keys = sorted((k for k in metrics if k.endswith(f"/{metric}") and k.count("/") == 1), key=lambda k: -metrics[k])
    shown = [f"{key.split('/')[0]} {with_interval(metrics, key)}" for key in keys]
    return f"**{metric}**: " + " > ".join(shown) if shown else ""


def publish_evaluations(cfg, env: dict, stages: list[dict]) -> str:
    """Log the headline on the parent run (comparison table, the evaluation's figures, the training-curves
    panel, the comparison as the run's description) and return it as markdown for the Prefect report."""
    from tasks.machinery import figures
    from tasks.machinery.store import ArtifactStore, Ref

    uri, run_id = env["tracking_uri"], env["parent_run_id"]
    attach_datasets(uri, run_id, stages)
    evaluations = [s for s in stages if s.get("kind") == "evaluate" and s.get("output_uri")]
    parts, drawn = [], False
    for stage in evaluations:
        folder = "" if len(evaluations) == 1 else f"{stage['name']}/"
        rows = comparison_rows(stage["metrics"])
        if not rows:
            continue
        tracking.log_table(uri, run_id, rows, f"{folder}comparison_table.json")
        output = ArtifactStore(cfg.storage.root).materialize(Ref(stage["output_uri"], stage["output_digest"]))
        if (output / "figures").is_dir():
            tracking.log_artifacts(uri, run_id, output / "figures", folder.rstrip("/") or None)
            drawn = True
        parts.append("\n\n".join(line for line in (
            ranking(stage["metrics"]),
            f"Every model on the held-out prompts (evaluation `{stage['name']}`), value [bootstrap interval]; "
            f"table {folder}comparison_table.json, figures {folder}comparison.png, {folder}win_rates.png, "
            f"{folder}reward_distributions.png, training_curves.png:", markdown_table(rows)) if line))
    with tempfile.TemporaryDirectory() as tmp:  # an evaluation with `figures: false` turns the run's pictures off
        if (drawn or not evaluations) and figures.training_curves(training_curves(uri, stages), Path(tmp)):
            tracking.log_artifact(uri, run_id, Path(tmp) / "training_curves.png", None)
            tracking.log_artifact(uri, run_id, Path(tmp) / "training_curves.json", None)
    report = "\n\n".join(decisions(uri, stages) + parts)
    if report:
        tracking.set_tags(uri, run_id, {"mlflow.note.content": report})
    return report
