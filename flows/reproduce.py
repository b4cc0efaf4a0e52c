"""`posttrain reproduce RUN_ID`: rebuild a pipeline run from what MLflow holds and compare.

The parent run holds the resolved config (`config/resolved.yaml`), the library versions
(`config/versions.json`), the git commit and a digest of the project's source, and its prepare_data
stage run holds the digests of the input data. The reproduction refuses to start when the code,
the library versions or the inputs differ (unless allowed, which the new run records), reruns every
stage into a fresh storage namespace (so nothing comes from cache), tags the new run as a
reproduction, and compares every metric and every stage's output digest with the original.

What it can promise depends on the hardware (tasks/machinery/hardware.py): on the same hardware, versions and
thread count the rerun is bit-identical, so it demands exact equality. On other hardware float
arithmetic rounds differently and training amplifies it, so it says so before rerunning, compares the
metrics within a tolerance it prints, and shows the output digests without requiring them to match.
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
from tasks.machinery import hardware, tracking
from tasks.machinery.cachekeys import library_versions

# Default tolerance when the hardware differs: |a - b| <= ATOL + RTOL * |a| for every metric.
CROSS_HARDWARE_RTOL = 0.1
CROSS_HARDWARE_ATOL = 0.05


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
    hardware: dict[str, dict[str, str]] = field(default_factory=dict)  # "pipeline" and each stage -> description
    problems: list[str] = field(default_factory=list)

    def hardware_differences(self, current: dict) -> list[str]:
        """What differs between where the run computed (pipeline and stages) and `current`."""
        found: dict[str, None] = {}
        for where, recorded in self.hardware.items():
            for line in hardware.differences(recorded, current) if recorded else []:
                found[line if where == "pipeline" else f"{where}: {line}"] = None
        return list(found)


@dataclass
class Tolerance:
    """How a reproduction is compared: exact on the same hardware, within rtol/atol elsewhere."""

    rtol: float = 0.0
    atol: float = 0.0
    digests_must_match: bool = True

    @classmethod
    def for_hardware(cls, differs: bool, rtol: float | None, atol: float | None) -> "Tolerance":
        if differs:
            return cls(CROSS_HARDWARE_RTOL if rtol is None else rtol, CROSS_HARDWARE_ATOL if atol is None else atol,
                       digests_must_match=False)
        return cls(rtol or 0.0, atol or 0.0, digests_must_match=True)

    def agree(self, a: float, b: float) -> bool:
        return a == b or abs(a - b) <= self.atol + self.rtol * abs(a)

    def describe(self) -> str:
        if not self.rtol and not self.atol:
            return "exact equality"
        return f"|original - reproduction| <= {self.atol:g} + {self.rtol:g} x |original|"


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
    machines = {"pipeline": hardware.from_tags(tags)}
    for child in children:
        stage = child.data.tags.get("posttrain.stage", "?")
        if child.data.tags.get("posttrain.kind", stage) == "prepare_data":
            input_digests |= {f"{stage}.{k.removeprefix('posttrain.input.')}": v.rsplit("@", 1)[-1]
                              for k, v in child.data.tags.items()
                              if k.startswith("posttrain.input.") and not k.endswith(".revision")}
        if child.data.tags.get("posttrain.cached") == "false":  # a cached stage computed elsewhere, earlier
            machines[child.data.tags.get("posttrain.stage", "?")] = hardware.from_tags(child.data.tags)
    return Recorded(run_id, config, versions, tags, dict(run.data.metrics), stage_digests, input_digests, machines)


def check_reproducible(rec: Recorded, cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """(code problems, input problems) between the recorded run and this checkout and data."""
    from tasks.machinery.sources import fingerprint

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
    for where, src in cfg.data_sources().items():
        recorded = rec.input_digests.get(where)
        now = fingerprint(src)["digest"]
        if recorded is None or not now.startswith(recorded):
            inputs.append(f"input stages.{where} ({src.source}): digest {now[:16]} now, {recorded} recorded")
    return code, inputs


def compare(rec: Recorded, summary: dict, tolerance: Tolerance) -> list[tuple[str, str, str, str]]:
    """Rows (name, original, reproduction, verdict) for every metric and stage output digest; the verdict
    is "equal", "within tolerance", "differs" or, for digests on other hardware, "differs (expected)"."""
    rows = []
    names = set(rec.metrics) | set(summary["metrics"])
    for name in sorted(n for n in names if not n.endswith(("seconds", "runtime"))):  # wall time is not a result
        a, b = rec.metrics.get(name), summary["metrics"].get(name)
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            verdict = "equal" if a is not None and b is not None and math.isnan(a) and math.isnan(b) else "differs"
        else:
            verdict = "equal" if a == b else "within tolerance" if tolerance.agree(a, b) else "differs"
        rows.append((name, _fmt(a), _fmt(b), verdict))
    new_digests = {s["name"]: s.get("output_digest", "") for s in summary["stages"]}
    for stage in sorted(set(rec.stage_digests) | set(new_digests)):
        a, b = rec.stage_digests.get(stage, ""), new_digests.get(stage, "")
        verdict = "equal" if a and a == b else "differs" if tolerance.digests_must_match else "differs (expected)"
        rows.append((f"{stage} output digest", a[:16], b[:16], verdict))
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
