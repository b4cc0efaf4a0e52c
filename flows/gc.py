"""`posttrain gc`: find (and with --yes delete) what the artifact store keeps but no run needs.

* orphaned attempts: folders of attempts that never committed (a crash, a lost commit race), older
  than --min-age-hours so that a stage writing right now is left alone;
* quarantined outputs: manifests set aside as corrupted or refreshed, with the files they named;
* checkpoints of committed outputs: resume points of stages that have since finished;
* unreferenced outputs: committed outputs that no MLflow stage run of the last --keep-days days
  names (tag posttrain.output_uri) and no registered model version is made of, when the tracking store can
  be read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tasks.machinery.store import MANIFEST, ArtifactStore

SKIPPED_AREAS = ("prefect-results", "reproductions")


@dataclass
class Garbage:
    path: str  # in the store's filesystem
    reason: str
    bytes: int


def _age_hours(fs, path: str) -> float:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return 0.0
    modified = info.get("mtime") or info.get("LastModified") or info.get("created")
    if modified is None:  # object stores have no folder times: look at the files
        times = [i.get("mtime") or i.get("LastModified") for i in fs.find(path, detail=True).values()]
        modified = max((t for t in times if t is not None), default=None)
    if modified is None:
        return float("inf")
    stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
    return (time.time() - stamp) / 3600


def _size(fs, path: str) -> int:
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def find_garbage(store: ArtifactStore, referenced: set[str] | None, min_age_hours: float = 24.0) -> list[Garbage]:
    """Everything collectable; `referenced` (output URIs recent runs use) None skips the unreferenced check."""
    fs, found = store.fs, []
    areas = [a.rstrip("/").rsplit("/", 1)[-1] for a in fs.ls(store.root_path, detail=False, refresh=True)
             if fs.isdir(a)] if fs.exists(store.root_path) else []
    committed: set[tuple[str, str]] = set()
    for area in sorted(a for a in areas if a not in SKIPPED_AREAS):
        for key in store.list_keys(area):
            base = f"{store.root_path.rstrip('/')}/{area}/{key}"
            entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=False, refresh=True)]
            manifest = store.read_manifest(store.uri_for(area, key))
            if manifest is not None:
                committed.add((area, key))
            kept = manifest["attempt"] if manifest else None
            aside = [e for e in entries if e.startswith(f"{MANIFEST}.corrupt-") and not e.endswith(".reason.txt")]
            quarantined_attempts = set()
            for name in aside:
                old = store._read_json(f"{base}/{name}") or {}
                attempt = old.get("attempt")
                paths = [f"{base}/{name}", f"{base}/{name}.reason.txt"]
                if attempt and attempt != kept:
                    quarantined_attempts.add(attempt)
                    paths.append(f"{base}/{attempt}")
                reason = "quarantined output"
                try:
                    reason += f" ({fs.cat(f'{base}/{name}.reason.txt').decode()[:80]})"
                except FileNotFoundError:
                    pass
                found += [Garbage(p, reason, _size(fs, p)) for p in paths if fs.exists(p)]
            for name in entries:
                if name.startswith("attempt-") and name != kept and name not in quarantined_attempts:
                    path = f"{base}/{name}"
                    if _age_hours(fs, path) >= min_age_hours:
                        found.append(Garbage(path, "orphaned attempt (never committed)", _size(fs, path)))
    for area in sorted(a for a in areas if a.endswith(".checkpoints")):
        kind = area.removesuffix(".checkpoints")
        for name in store.list_keys(area):
            key = name.rsplit("-step", 1)[0]
            if (kind, key) in committed:
                path = f"{store.root_path.rstrip('/')}/{area}/{name}"
                found.append(Garbage(path, f"checkpoint of the committed output {kind}/{key}", _size(fs, path)))
    if referenced is not None:
        referenced = with_adapter_bases(store, referenced)
        for area, key in sorted(committed):
            if area.endswith(".checkpoints"):
                continue
            uri = store.uri_for(area, key)
            if uri not in referenced:
                path = f"{store.root_path.rstrip('/')}/{area}/{key}"
                found.append(Garbage(path, "output no recent run references", _size(fs, path)))
    return found


def with_adapter_bases(store: ArtifactStore, referenced: set[str]) -> set[str]:
    """`referenced` plus every output a referenced adapter is applied to (its adapter_base.json), transitively:
    an adapter is only usable with its base."""
    import json

    from tasks.machinery.modeling import ADAPTER_BASE

    kept, todo = set(referenced), list(referenced)
    while todo:
        uri = todo.pop()
        manifest = store.read_manifest(uri) if uri.startswith(store.root_uri + "/") else None
        if not manifest or ADAPTER_BASE not in manifest.get("files", {}):
            continue
        base = json.loads(store.fs.cat(f"{store._path_of_uri(uri)}/{manifest['attempt']}/{ADAPTER_BASE}"))["uri"]
        if base not in kept:
            kept.add(base)
            todo.append(base)
    return kept


def referenced_outputs(tracking_uri: str, keep_days: float) -> set[str]:
    """Output URIs named by the stage runs MLflow has from the last `keep_days` days."""
    from tasks.machinery import tracking

    client = tracking.client(tracking_uri)
    since = int((time.time() - keep_days * 86400) * 1000)
    experiments = [e.experiment_id for e in client.search_experiments()]
    uris, token = set(), None
    while experiments:
        page = client.search_runs(experiments, filter_string=f"attributes.start_time > {since}", max_results=1000,
                                  page_token=token)
        uris |= {r.data.tags["posttrain.output_uri"] for r in page if "posttrain.output_uri" in r.data.tags}
        token = page.token
        if not token:
            break
    # A registered model version whose files are an output in the store (the run registered it by reference)
    # keeps that output, however old: `models:/name/N` must keep loading.
    for version in client.search_model_versions():
        source = str(version.source or "")
        if "/attempt-" in source:
            uris.add(source.rsplit("/attempt-", 1)[0])
    return uris


def delete(store: ArtifactStore, items: list[Garbage]) -> None:
    """Manifests first (an output stops being complete before its files go), then everything else."""
    for item in sorted(items, key=lambda g: (not g.path.endswith(MANIFEST), g.path)):
        manifest = f"{item.path}/{MANIFEST}"
        if store.fs.exists(manifest):
            store.fs.rm(manifest)
        if store.fs.exists(item.path):
            store.fs.rm(item.path, recursive=True)
