"""The pipeline's parent MLflow run and its Prefect artifacts: opened before the stages, closed after."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import yaml

from flows.config import PipelineConfig
from tasks import tracking
from tasks.cachekeys import library_versions
from tasks.stage import RunEnv
from tasks.store import state_home

SOURCE_DIR = Path(__file__).resolve().parent.parent


def git_commit() -> tuple[str, bool]:
    """(commit, dirty) of the source tree, or ('unknown', False) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_DIR, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


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


def open_pipeline_run(cfg: PipelineConfig, extra_tags: dict[str, str] | None = None) -> dict:
    """Create the parent run (params, resolved config, versions, commit) and return the stages' RunEnv."""
    uri = cfg.tracking.uri
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment, _artifact_location(uri))
    from tasks import hardware

    commit, dirty = git_commit()
    machine = hardware.describe()
    versions = {**library_versions(), "python": platform.python_version(),
                **{name: _version(name) for name in ("prefect", "mlflow", "posttrain")}}
    tags = {
        "posttrain.kind": "pipeline",
        "mlflow.source.git.commit": commit,
        "posttrain.git_dirty": dirty,
        "posttrain.source_digest": source_digest(),
        "prefect.flow_run_id": _flow_run_id(),
        "posttrain.command": tracking.redact(" ".join(sys.argv))[:500],
        **{f"posttrain.version.{k}": v for k, v in versions.items()},
        **hardware.as_tags(machine),
        **(extra_tags or {}),
    }
    run_id = tracking.start_run(uri, experiment_id, cfg.name, tags)
    resolved = tracking.redact(cfg.model_dump(mode="json"))
    tracking.log_params(uri, run_id, tracking.flatten(resolved))
    tracking.log_text(uri, run_id, yaml.safe_dump(resolved, sort_keys=False), "config/resolved.yaml")
    tracking.log_dict(uri, run_id, versions, "config/versions.json")
    tracking.log_dict(uri, run_id, machine, "config/hardware.json")
    env = RunEnv(storage_root=cfg.storage.root, tracking_uri=uri, experiment_id=experiment_id,
                 parent_run_id=run_id, trust_remote_code=cfg.model.trust_remote_code,
                 log_model_max_mb=cfg.tracking.log_model_max_mb, recipe=cfg.name)
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
    """Every stage's metrics under the stage's name; a recipe's one evaluation keeps its own names
    (base/..., sft/..., policy/...), as do all of them when there is only one."""
    evaluations = [s for s in stages if s.get("kind") == "evaluate"]
    merged = {}
    for stage in stages:
        plain = len(evaluations) == 1 and stage.get("kind") == "evaluate"
        for key, value in stage["metrics"].items():
            merged[key if plain else f"{stage['name']}/{key}"] = value
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
    tracking.log_metrics(uri, run_id, summary["metrics"])
    tracking.set_tags(uri, run_id, {f"posttrain.cache_key.{s['name']}": s["cache_key"] for s in stages
                                    if s["cache_key"]})
    tracking.set_tags(uri, run_id, {f"posttrain.status.{s['name']}": s["status"] for s in stages})
    tracking.log_dict(uri, run_id, summary, "summary.json")
    publish_prefect_summary(summary)
    tracking.end_run(uri, run_id, failed=error is not None, error=None if error is None else str(error))
    return summary


def publish_prefect_summary(summary: dict) -> None:
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
        lines += [f"Open MLflow: `mlflow ui --backend-store-uri {uri}` (then http://127.0.0.1:5000)", ""]
    lines += ["| stage | kind | status | seconds | headline metrics | MLflow run | output |",
              "|---|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in headline(s).items()) or s.get("error", "")[:200]
        lines.append(f"| {s['name']} | {s.get('kind', '')} | {s['status']} | {s['seconds']:.1f} | {shown} | "
                     f"{link(s['mlflow_run_id'])} | {s['output_uri'] or '-'} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(summary["metrics"].items())]
    create_markdown_artifact(key="posttrain-report", markdown="\n".join(lines), description="posttrain run report")
