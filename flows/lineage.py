"""The pipeline's parent MLflow run and its Prefect artifacts: opened before the stages, closed after."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import yaml

from flows.config import PipelineConfig
from tasks.machinery import tracking
from tasks.machinery.cachekeys import library_versions
from tasks.machinery.context import RunEnv
from tasks.machinery.store import state_home

SOURCE_DIR = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    """A git command's output in the source tree; None outside a git checkout (or without git)."""
    try:
        done = subprocess.run(["git", *args], cwd=SOURCE_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> tuple[str, bool]:
    """(commit, dirty) of the source tree, or ('unknown', False) outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return "unknown", False
    return commit, bool(_git("status", "--porcelain", "--untracked-files=no"))


def source_digest() -> str:
    """Digest of the project's Python source (flows/ and tasks/): equal code, equal digest, git or not."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted([*SOURCE_DIR.glob("flows/*.py"), *SOURCE_DIR.glob("tasks/*.py")]):
        h.update(path.relative_to(SOURCE_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def _artifact_location(tracking_uri: str) -> str | None:
    """Local SQLite stores keep run artifacts in the state folder rather than ./mlruns."""
    if tracking_uri.startswith("sqlite:"):
        return (state_home() / "mlartifacts").as_uri()
    return None


def source_tags(commit: str, source: str) -> dict[str, str]:
    """MLflow's own source fields (the UI's Source and Version columns): the recipe, the commit and, in a git
    checkout with a remote, its URL and branch."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": source, "mlflow.source.git.commit": commit}
    if commit != "unknown":
        if remote := _git("remote", "get-url", "origin"):
            tags["mlflow.source.git.repoURL"] = tracking.strip_credentials(remote)
        if (branch := _git("rev-parse", "--abbrev-ref", "HEAD")) and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags


def run_name(recipe: str, overrides: str, flow_run_id: str) -> str:
    """A parent run's name that is unique and says what differs: recipe, start time, overrides."""
    import time
    import uuid

    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    suffix = (flow_run_id or uuid.uuid4().hex)[:6]
    return " · ".join(part for part in (recipe, stamp, overrides[:150], suffix) if part)


def recipe_tags(recipe: str, overrides: list[str] | None) -> dict[str, str]:
    """The tags naming the recipe file and the overrides a run started from (its Source and its name)."""
    return {"posttrain.recipe": recipe, "posttrain.overrides": tracking.redact(" ".join(overrides or []))}


def open_pipeline_run(cfg: PipelineConfig, extra_tags: dict[str, str] | None = None) -> dict:
    """Create the parent run (params, resolved config, versions, commit) and return the stages' RunEnv.
    `extra_tags` may name the recipe file and overrides (recipe_tags)."""
    uri = cfg.tracking.uri
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, _artifact_location(uri))
    from tasks.machinery import hardware

    commit, dirty = git_commit()
    said = extra_tags or {}
    sources = source_tags(commit, said.get("posttrain.recipe") or (sys.argv[0] if sys.argv and sys.argv[0]
                                                                   else cfg.name))
    machine = hardware.describe()
    versions = {**library_versions(), "python": platform.python_version(),
                **{name: _version(name) for name in ("prefect", "mlflow", "posttrain")}}
    tags = {
        "posttrain.kind": "pipeline",
        **sources,
        "posttrain.git_dirty": dirty,
        "posttrain.source_digest": source_digest(),
        "prefect.flow_run_id": _flow_run_id(),
        "posttrain.command": tracking.redact(" ".join(sys.argv))[:500],
        **{f"posttrain.version.{k}": v for k, v in versions.items()},
        **hardware.as_tags(machine),
        **(extra_tags or {}),
    }
    run_id = tracking.start_run(uri, experiment_id, run_name(cfg.name, said.get("posttrain.overrides", ""),
                                                             _flow_run_id()), tags)
    resolved = tracking.redact(cfg.model_dump(mode="json"))
    tracking.log_params(uri, run_id, tracking.flatten(resolved))
    tracking.log_text(uri, run_id, yaml.safe_dump(resolved, sort_keys=False), "config/resolved.yaml")
    tracking.log_dict(uri, run_id, versions, "config/versions.json")
    tracking.log_dict(uri, run_id, machine, "config/hardware.json")
    env = RunEnv(storage_root=cfg.storage.root, tracking_uri=uri, experiment_id=experiment_id,
                 parent_run_id=run_id, trust_remote_code=cfg.model.trust_remote_code,
                 log_model_max_mb=cfg.tracking.log_model_max_mb, recipe=cfg.name, source_tags=sources,
                 reproduction_of=said.get("posttrain.reproduction_of", ""))
    _run_logger().info("MLflow parent run %s", tracking.run_link(uri, experiment_id, run_id))
    return env.to_dict()


def _run_logger():
    """The Prefect flow run's logger (its lines show in the UI), or the posttrain logger outside a run."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("posttrain")


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def summary_metrics(stages: list[dict]) -> dict[str, float]:
    """The parent run's metrics, one scheme: a stage's own metrics as <stage>/<metric>; an evaluation's per-model
    numbers as eval/<model>/<metric> (eval/<stage>/<model>/<metric> when a recipe evaluates more than once)."""
    evaluations = [s for s in stages if s.get("kind") == "evaluate"]
    merged = {}
    for stage in stages:
        if stage.get("kind") == "evaluate":
            prefix = "eval/" if len(evaluations) == 1 else f"eval/{stage['name']}/"
        else:
            prefix = f"{stage['name']}/"
        merged.update({prefix + key: value for key, value in stage["metrics"].items()})
    return merged


def headline(stage: dict) -> dict[str, float]:
    """A stage's headline metrics, as its kind declares them."""
    from tasks.kinds import kinds

    kind = kinds().get(stage.get("kind") or stage["name"])
    return kind.headline_metrics(stage["metrics"]) if kind else {}


def close_pipeline_run(cfg: PipelineConfig, env: dict, stages: list[dict], error: BaseException | None) -> dict:
    uri, run_id = env["tracking_uri"], env["parent_run_id"]
    summary = {
        "mlflow_run_id": run_id,
        "flow_run_id": _flow_run_id(),
        "stages": stages,
        "metrics": summary_metrics(stages),
        "tracking_uri": tracking.redact(uri),
        "experiment_id": env["experiment_id"],
        "storage_root": cfg.storage.root,
    }
    # the evaluation's numbers first: the MLflow UI lists a run's metrics in the order they were logged
    ordered = sorted(summary["metrics"].items(), key=lambda item: not item[0].startswith("eval/"))
    tracking.log_metrics(uri, run_id, dict(ordered))
    try:
        from flows.report import publish_evaluations

        report = publish_evaluations(cfg, env, stages)
    except Exception as e:  # noqa: BLE001 - the pictures must never fail a finished run
        _run_logger().warning("evaluation figures not published on the parent run: %s", e)
        report = ""
    tracking.set_tags(uri, run_id, {f"posttrain.cache_key.{s['name']}": s["cache_key"] for s in stages
                                    if s["cache_key"]})
    tracking.set_tags(uri, run_id, {f"posttrain.status.{s['name']}": s["status"] for s in stages})
    tracking.log_dict(uri, run_id, summary, "summary.json")
    publish_prefect_summary(summary, report)
    tracking.end_run(uri, run_id, failed=error is not None, error=None if error is None else str(error))
    return summary


def publish_prefect_summary(summary: dict, report: str = "") -> None:
    """A table of stages (each with its headline metrics) and a markdown report linking each stage to its
    MLflow run, shown on the flow run's Artifacts tab."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [{"stage": s["name"], "kind": s.get("kind", ""), "status": s["status"], "seconds": s["seconds"],
             "headline": ", ".join(f"{k}={v:.4g}" for k, v in headline(s).items()) or s.get("error", "")[:200],
             "mlflow_run": s["mlflow_run_id"] or "", "output": s["output_uri"] or ""} for s in summary["stages"]]
    create_table_artifact(key="posttrain-stages", table=rows, description="Stages, cache status and headline metrics")
    uri, experiment = summary["tracking_uri"], summary["experiment_id"]
    http = uri.startswith(("http://", "https://"))

    def link(run_id: str | None) -> str:
        if not run_id:
            return "-"
        return f"[{run_id[:12]}]({tracking.run_link(uri, experiment, run_id)})" if http else f"`{run_id}`"

    lines = ["# posttrain run", "", f"MLflow parent run: {link(summary['mlflow_run_id'])}", ""]
    if not http:
        page = tracking.ui_link("http://127.0.0.1:5000", experiment, summary["mlflow_run_id"])
        lines += [f"Open MLflow: `mlflow ui --backend-store-uri {uri}`, then {page}", ""]
    lines += ["| stage | kind | status | seconds | headline metrics | MLflow run | output |",
              "|---|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in headline(s).items()) or s.get("error", "")[:200]
        lines.append(f"| {s['name']} | {s.get('kind', '')} | {s['status']} | {s['seconds']:.1f} | {shown} | "
                     f"{link(s['mlflow_run_id'])} | {s['output_uri'] or '-'} |")
    if report:  # the evaluation's comparison of every model, with intervals
        lines += ["", report]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(summary["metrics"].items())]
    create_markdown_artifact(key="posttrain-report", markdown="\n".join(lines), description="posttrain run report")
