"""`posttrain compare RUN_A RUN_B`: what differs between two pipeline runs — the settings (flattened, only
what differs), the code, library versions and data digests, each stage's output — and the metric table with
deltas (B − A). Reads only what MLflow holds (flows/reproduce.read_recorded)."""

from __future__ import annotations

import math
from pathlib import Path

from flows.reproduce import Recorded, read_recorded
from tasks.machinery import tracking

CODE_TAGS = {"posttrain.source_digest": "source digest", "mlflow.source.git.commit": "git commit",
             "posttrain.git_dirty": "uncommitted changes"}


def _changed(a: dict, b: dict) -> list[dict]:
    return [{"name": k, "a": a.get(k), "b": b.get(k)} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def compare_runs(a: Recorded, b: Recorded) -> dict:
    """{config, code, versions, data, outputs, metrics}: lists of {name, a, b} (metrics also `delta`)."""
    metrics = []
    for name in sorted(set(a.metrics) | set(b.metrics)):
        x, y = a.metrics.get(name), b.metrics.get(name)
        delta = y - x if x is not None and y is not None and not (math.isnan(x) or math.isnan(y)) else None
        metrics.append({"name": name, "a": x, "b": y, "delta": delta})
    code = [{**row, "name": CODE_TAGS[row["name"]]} for row in
            _changed({k: a.tags.get(k) for k in CODE_TAGS}, {k: b.tags.get(k) for k in CODE_TAGS})]
    return {
        "runs": {"a": a.run_id, "b": b.run_id},
        "config": _changed(tracking.flatten(a.config), tracking.flatten(b.config)),
        "code": code,
        "versions": _changed(a.versions, b.versions),
        "data": _changed(a.input_digests, b.input_digests),
        "outputs": _changed(a.stage_digests, b.stage_digests),
        "metrics": metrics,
    }


def read_both(run_a: str, run_b: str, tracking_uri: str, scratch: Path) -> tuple[Recorded, Recorded]:
    return read_recorded(run_a, tracking_uri, scratch / "a"), read_recorded(run_b, tracking_uri, scratch / "b")


def print_comparison(diff: dict, all_metrics: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def table(title: str, rows: list[dict], columns=("name", "a", "b")) -> None:
        if not rows:
            console.print(f"{title}: no difference")
            return
        t = Table(title=f"{title} (A = {diff['runs']['a'][:8]}, B = {diff['runs']['b'][:8]})")
        for column in columns:
            t.add_column(column)
        for row in rows:
            t.add_row(*(_show(row[c]) for c in columns))
        console.print(t)

    table("settings", diff["config"])
    table("code", diff["code"])
    table("library versions", diff["versions"])
    table("data digests", diff["data"])
    table("stage outputs", diff["outputs"])
    shown = [m for m in diff["metrics"] if all_metrics or m["delta"] != 0]
    table("metrics" + ("" if all_metrics else " that differ"), shown, ("name", "a", "b", "delta"))


def _show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:28] + "…" + text[-28:]
