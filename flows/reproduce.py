"""`posttrain reproduce RUN_ID`: rebuild a pipeline run from what MLflow holds and compare.

The parent run holds the resolved config (`config/resolved.yaml`), the library versions
(`config/versions.json`), the git commit and a digest of the project's source, and its prepare_data
stage run holds the digests of the input data. The reproduction refuses to start when the code,
the library versions or the inputs differ (unless allowed, which the new run records), reruns every
stage into a fresh storage namespace (so nothing comes from cache), tags the new run as a
reproduction, and compares every metric and every stage's output digest with the original.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flows.config import PipelineConfig
from flows.lineage import source_digest
from tasks import tracking
from tasks.cachekeys import library_versions


class ReproduceError(RuntimeError):
    """The run cannot be reproduced as asked; the message says why."""


@dataclass
class Recorded:
    run_id: str
    config: dict
    versions: dict
    tags: dict
    metrics: dict
    stage_digests: dict[str, str]
    input_digests: dict[str, str]
    problems: list[str] = field(default_factory=list)


def read_recorded(run_id: str, tracking_uri: str, scratch: Path) -> Recorded:
    from mlflow.exceptions import MlflowException

    client = tracking.client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ReproduceError(f"MLflow run {run_id} not found at {tracking_uri}: {e.message}") from None
    tags = run.data.tags
    if tags.get("posttrain.kind") != "pipeline":
        parent = tags.get("mlflow.parentRunId")
        hint = f" (it is a stage run; its pipeline run is {parent})" if parent else ""
        raise ReproduceError(f"MLflow run {run_id} is not a posttrain pipeline run{hint}")
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config/resolved.yaml", str(scratch))).read_text())
    versions = json.loads(Path(client.download_artifacts(run_id, "config/versions.json", str(scratch))).read_text())
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    stage_digests = {c.data.tags["posttrain.stage"]: c.data.tags.get("posttrain.output_digest", "")
                     for c in children if "posttrain.stage" in c.data.tags}
    input_digests = {}
    for child in children:
        if child.data.tags.get("posttrain.stage") == "prepare_data":
            input_digests = {k.removeprefix("posttrain.input."): v.rsplit("@", 1)[-1]
                             for k, v in child.data.tags.items() if k.startswith("posttrain.input.")}
    return Recorded(run_id, config, versions, tags, dict(run.data.metrics), stage_digests, input_digests)


def check_reproducible(rec: Recorded, cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """(code problems, input problems) between the recorded run and this checkout and data."""
    from tasks.data import source_fingerprint

    code = []
    recorded_source, checkout_source = rec.tags.get("posttrain.source_digest"), source_digest()
    if recorded_source != checkout_source:
        code.append(f"code: the project's source differs from the run's (recorded source digest "
                    f"{str(recorded_source)[:12]}, commit {rec.tags.get('mlflow.source.git.commit', '?')[:12]}; "
                    f"this checkout {checkout_source[:12]})")
    current = library_versions()
    for name, version in current.items():
        if rec.versions.get(name) != version:
            code.append(f"versions: {name} {rec.versions.get(name)} recorded, {version} installed")
    inputs = []
    for kind, src in cfg.data.sources().items():
        recorded = rec.input_digests.get(kind)
        now = source_fingerprint(src)
        if recorded is None or not now.startswith(recorded):
            inputs.append(f"input data.{kind} ({src.source}): digest {now[:16]} now, {recorded} recorded")
    return code, inputs


def compare(rec: Recorded, summary: dict, rtol: float) -> list[tuple[str, str, str, bool]]:
    """Rows (name, original, reproduction, equal) for every metric and stage output digest."""
    rows = []
    names = set(rec.metrics) | set(summary["metrics"])
    for name in sorted(n for n in names if not n.endswith(("seconds", "runtime"))):  # wall time is not a result
        a, b = rec.metrics.get(name), summary["metrics"].get(name)
        same = a is not None and b is not None and (a == b or math.isclose(a, b, rel_tol=rtol, abs_tol=0.0))
        rows.append((name, _fmt(a), _fmt(b), same))
    new_digests = {s["name"]: s.get("output_digest", "") for s in summary["stages"]}
    for stage in sorted(set(rec.stage_digests) | set(new_digests)):
        a, b = rec.stage_digests.get(stage, ""), new_digests.get(stage, "")
        rows.append((f"{stage} output digest", a[:16], b[:16], bool(a) and a == b))
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.6g}"


def prepare_reproduction(rec: Recorded, tracking_uri: str, allow_code: bool, allow_inputs: bool,
                         namespace: str | None = None) -> tuple[PipelineConfig, dict]:
    """The config to rerun (fresh storage namespace, same tracking server) and the tags the new run gets."""
    cfg = PipelineConfig.model_validate(rec.config)
    code, inputs = check_reproducible(rec, cfg)
    refused = (code if not allow_code else []) + (inputs if not allow_inputs else [])
    if refused:
        flags = []
        if code and not allow_code:
            flags.append("--allow-code-change")
        if inputs and not allow_inputs:
            flags.append("--allow-input-change")
        raise ReproduceError("cannot reproduce exactly:\n  " + "\n  ".join(refused)
                             + f"\n(pass {' and '.join(flags)} to rerun anyway; the new run records it)")
    namespace = namespace or f"reproductions/{rec.run_id}-{time.strftime('%Y%m%dT%H%M%S')}"
    cfg = cfg.model_copy(update={
        "storage": cfg.storage.model_copy(update={"root": f"{cfg.storage.root.rstrip('/')}/{namespace}"}),
        "tracking": cfg.tracking.model_copy(update={"uri": tracking_uri}),
    }, deep=True)
    tags = {"posttrain.reproduction_of": rec.run_id,
            "posttrain.reproduce.allowed_code_change": "; ".join(code) if allow_code and code else "",
            "posttrain.reproduce.allowed_input_change": "; ".join(inputs) if allow_inputs and inputs else ""}
    return cfg, {k: v for k, v in tags.items() if v}
