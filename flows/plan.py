"""`posttrain plan`: what a run would do, before it spends compute.

For each stage of the recipe, in order: its cache key, whether it would run or come from the store,
and why it would run: which setting, input, code file or library changed since this stage's last
stored output, or that it never ran. Keys of stages downstream of one that runs are not known until
that stage has run (they depend on its output's digest).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from flows.config import PipelineConfig
from flows.graph import build_nodes, node_names, with_upstream
from flows.pipeline import node_inputs, selection, stage_parameters
from tasks.machinery.context import store_area
from tasks.stage import cache_key_for
from tasks.machinery.store import ArtifactStore


@dataclass
class PlanRow:
    name: str
    kind: str
    cache_key: str | None
    action: str  # run | cached | missing (not selected, and not in the store: the run would stop there)
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(cfg: PipelineConfig, only=(), start_from=(), refresh=()) -> list[PlanRow]:
    cfg = cfg.resolved()
    store = ArtifactStore(cfg.storage.root)
    nodes = build_nodes(cfg)
    chosen = selection(nodes, only, start_from)
    refreshed = set().union(*(node_names(nodes, name) for name in refresh))
    rows: dict[str, PlanRow] = {}
    outputs: dict[str, dict] = {}
    models: dict[str, dict] = {}
    stored_by_kind: dict[str, list[dict]] = {}
    needed = with_upstream(nodes, chosen)
    for node in (n for n in nodes if n.name in needed):
        selected = node.name in chosen
        pending = [up for up in node.upstream if rows[up].action != "cached"]
        if pending:
            slot = next(s for s, up in node.stage_inputs.items() if up == pending[0])
            rows[node.name] = PlanRow(node.name, node.kind.name, None, "run" if selected else "missing",
                                      f"its input {slot} comes from {pending[0]}, which runs first")
            continue
        params = stage_parameters(cfg, node, node_inputs(cfg, node, outputs, models), {"recipe": cfg.name})
        key = cache_key_for(node.kind.name, params)
        stored = store.lookup(store_area(key), key)
        if stored is not None:
            outputs[node.name] = stored.to_dict()
        if stored is not None and node.name in refreshed:
            rows[node.name] = PlanRow(node.name, node.kind.name, key, "run", "--refresh asks to recompute it")
        elif stored is not None:
            rows[node.name] = PlanRow(node.name, node.kind.name, key, "cached", "same settings, inputs and code "
                                      "as its stored output")
        elif selected:
            if node.kind.name not in stored_by_kind:
                stored_by_kind[node.kind.name] = _stored_metadata(store, node.kind.name)
            reason = why_it_runs(stored_by_kind[node.kind.name], cfg, node, params)
            rows[node.name] = PlanRow(node.name, node.kind.name, key, "run", reason)
        else:
            rows[node.name] = PlanRow(node.name, node.kind.name, key, "missing", "not selected, and not in the "
                                      f"store: run it first (--only {node.instance})")
    return list(rows.values())


def downloads(cfg: PipelineConfig) -> list[str]:
    """What a run would fetch from the Hugging Face Hub because the local Hub cache lacks it: models named
    as stage inputs and Hub data sets, each with the stages that read it."""
    from huggingface_hub import constants

    from tasks.machinery.modeling import hub_repo
    from tasks.machinery.sources import format_of

    cache = Path(constants.HF_HUB_CACHE)
    wanted: dict[str, list[str]] = {}
    for name, inst in cfg.stages.items():
        for value in inst.inputs.values():
            repo = None if value in cfg.stages else hub_repo(value)
            if repo and not (cache / f"models--{repo.replace('/', '--')}").is_dir():
                wanted.setdefault(f"model {value}", []).append(name)
    for where, src in cfg.data_sources().items():
        repo = src.source.removeprefix("hf:")
        if (format_of(src.source, src.format) == "hf" and not Path(repo).exists()
                and not (cache / f"datasets--{repo.replace('/', '--')}").is_dir()):
            wanted.setdefault(f"data set {repo} (split {src.split})", []).append(where.split(".")[0])
    return [f"{what} (read by {', '.join(dict.fromkeys(stages))})" for what, stages in wanted.items()]


def why_it_runs(stored: list[dict], cfg: PipelineConfig, node, params: dict) -> str:
    """What differs from the last stored output of this stage (same recipe and instance name); `stored`:
    the metadata of every stored output of its kind."""
    from tasks.machinery.cachekeys import code_files, library_versions

    previous = _last_output(stored, node.name, cfg.name)
    if previous is None:
        return "never ran: no stored output of this stage"
    changes = []
    old, new = _flatten(previous.get("config", {})), _flatten(params["config"])
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        changes.append("setting " + ", ".join(f"{k} {old.get(k, '-')!r} -> {new.get(k, '-')!r}" for k in changed[:4])
                       + (f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""))
    old_inputs = {k: v.get("digest") for k, v in previous.get("inputs", {}).items()}
    new_inputs = {k: v["digest"] for k, v in params["inputs"].items()}
    moved = [k for k in sorted(set(old_inputs) | set(new_inputs)) if old_inputs.get(k) != new_inputs.get(k)]
    if moved:
        changes.append("input " + ", ".join(moved) + " changed")
    if previous.get("seed") != params["seed"]:
        changes.append(f"seed {previous.get('seed')} -> {params['seed']}")
    old_code, new_code = previous.get("code", {}), code_files(node.kind.module)
    edited = [f for f in sorted(set(old_code) | set(new_code)) if old_code.get(f) != new_code.get(f)]
    if edited:
        changes.append("code " + ", ".join(edited) + " changed")
    old_libs, new_libs = previous.get("libraries", {}), library_versions()
    upgraded = [f"{k} {old_libs.get(k)} -> {new_libs.get(k)}" for k in sorted(new_libs) if old_libs.get(k) != new_libs[k]]
    if upgraded:
        changes.append("libraries " + ", ".join(upgraded))
    return "; ".join(changes) or "its stored output is gone (deleted or quarantined)"


def _stored_metadata(store: ArtifactStore, kind: str) -> list[dict]:
    """The metadata of every committed output of a kind (read once per plan, whatever its number of stages)."""
    manifests = (store.read_manifest(store.uri_for(kind, key)) for key in store.list_keys(kind))
    return [m.get("metadata") or {} for m in manifests if m]


def _last_output(stored: list[dict], instance: str, recipe: str) -> dict | None:
    """The newest of `stored` made by `instance` (preferring the same recipe)."""
    found = [(m.get("recipe") == recipe, m.get("committed_at", 0), m) for m in stored if m.get("instance") == instance]
    return max(found, key=lambda f: f[:2])[2] if found else None


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat |= _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def print_plan(rows: list[PlanRow], fetches: list[str] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="posttrain plan")
    for column in ("stage", "kind", "action", "cache key", "why"):
        table.add_column(column, overflow="fold")
    colors = {"run": "yellow", "cached": "cyan", "missing": "red"}
    for row in rows:
        table.add_row(row.name, row.kind, f"[{colors[row.action]}]{row.action}", row.cache_key or "(after inputs)",
                      row.reason)
    Console().print(table)
    runs = sum(r.action == "run" for r in rows)
    print(f"{runs} stage(s) would run, {sum(r.action == 'cached' for r in rows)} come from the store"
          + (f", {sum(r.action == 'missing' for r in rows)} missing" if any(r.action == "missing" for r in rows) else ""))
    if fetches:
        print("to download from the Hugging Face Hub (not in the local Hub cache):")
        for line in fetches:
            print(f"  {line}")
