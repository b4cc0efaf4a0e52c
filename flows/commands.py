"""The `posttrain` commands (`posttrain run | plan | validate | gc | reproduce | promote | export | compare |
server | deploy`): each takes the parsed arguments and returns the exit code."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from flows.session import (load_recipe, local_prefect_server, prepare_environment, recipe_and_selection, run_pipeline,
                           setup_logging, tracking_uri_of)


def cmd_run(args) -> int:
    home = prepare_environment()
    setup_logging()
    loaded = recipe_and_selection(args)
    if loaded is None:
        return 2
    config, chosen = loaded
    from flows.lineage import recipe_tags

    said = recipe_tags(args.config or "configs/demo.yaml", args.set)
    return run_pipeline(config, args.summary_json, home, said, server=local_prefect_server(), selection=chosen)[0]


def cmd_validate(args) -> int:
    prepare_environment()
    config = load_recipe(args)
    if config is None:
        return 2
    from flows.graph import build_nodes

    print(f"{args.config or 'configs/demo.yaml'}: recipe {config.name!r} is valid; stages in order:")
    for node in build_nodes(config):
        wired = ", ".join([f"{slot}<-{up}" for slot, up in node.stage_inputs.items()]
                          + [f"{slot}<-{ref}" for slot, ref in node.model_inputs.items()])
        print(f"  {node.name:<22} {node.kind.name:<13} {wired}")
    return 0


def cmd_plan(args) -> int:
    home = prepare_environment()
    loaded = recipe_and_selection(args)
    if loaded is None:
        return 2
    config, chosen = loaded
    from flows.plan import downloads, make_plan, print_plan

    try:
        rows = make_plan(config, chosen["only"], chosen["start_from"], chosen["refresh"])
    except (OSError, ValueError) as e:  # an input cannot be read (data file, model folder)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    fetches = downloads(config.resolved())
    print_plan(rows, fetches)
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": config.name, "state_folder": str(home),
                                               "stages": [r.to_dict() for r in rows], "downloads": fetches},
                                              indent=2))
    return 0


def cmd_gc(args) -> int:
    home = prepare_environment()
    from flows.config import StorageConfig
    from flows.gc import delete, find_garbage, referenced_outputs
    from tasks.machinery.store import ArtifactStore

    root = args.storage_root or StorageConfig().root or str(home / "artifacts")
    store = ArtifactStore(root)
    tracking_uri = tracking_uri_of(args, home)
    referenced = None
    if args.keep_days > 0:
        try:
            referenced = referenced_outputs(tracking_uri, args.keep_days)
        except Exception as e:  # the tracking store is down or elsewhere: keep every committed output
            print(f"warning: cannot read runs from {tracking_uri} ({type(e).__name__}: {e}); keeping every "
                  "committed output", file=sys.stderr)
    items = find_garbage(store, referenced, args.min_age_hours)
    for item in items:
        print(f"{item.bytes / 2**20:10.1f} MiB  {item.reason:<45}  {item.path}")
    total = sum(i.bytes for i in items) / 2**20
    if not items:
        print(f"nothing to collect in {root}")
    elif args.yes:
        delete(store, items)
        print(f"deleted {len(items)} item(s), {total:.1f} MiB, from {root}")
    else:
        print(f"{len(items)} item(s), {total:.1f} MiB, would be deleted from {root}; run again with --yes to delete")
    return 0


def cmd_compare(args) -> int:
    import tempfile

    home = prepare_environment()
    from flows.compare import compare_runs, print_comparison, read_both
    from flows.reproduce import ReproduceError

    tracking_uri = tracking_uri_of(args, home)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            diff = compare_runs(*read_both(args.run_a, args.run_b, tracking_uri, Path(scratch)))
    except ReproduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if args.json:
        Path(args.json).write_text(json.dumps(diff, indent=2, default=str))
    else:
        print_comparison(diff, args.all_metrics)
    return 0


def cmd_promote(args) -> int:
    """Make the model a past run registered the champion by hand (what the gate would have done)."""
    home = prepare_environment()
    from tasks.machinery import tracking

    tracking_uri = tracking_uri_of(args, home)
    client = tracking.client(tracking_uri)
    try:
        run = client.get_run(args.run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for an unknown run
        print(f"error: MLflow run {args.run_id} not found at {tracking.redact(tracking_uri)}: {e}", file=sys.stderr)
        return 3
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{args.run_id}'")
    if args.stage:
        chosen = [c for c in children if c.data.tags.get("posttrain.stage") == args.stage]
        tag = "posttrain.registered_model"
    else:
        chosen = [c for c in children if c.data.tags.get("posttrain.kind") == "promote"]
        tag = "posttrain.promote.model"
    uri = next((c.data.tags[tag] for c in chosen if tag in c.data.tags), None)
    if uri is None:
        what = f"stage {args.stage!r}" if args.stage else "promote stage"
        print(f"error: run {args.run_id} has no {what} with a registered model (--stage NAME picks a stage's model)",
              file=sys.stderr)
        return 3
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, "posttrain.promoted_by_hand", time.strftime("%Y-%m-%dT%H:%M:%S"))
    print(f"models:/{name}/{version} is now models:/{name}@champion")
    return 0


def cmd_export(args) -> int:
    """A model (folder, stage output, registry alias, URI) as one GGUF file for llama.cpp, Ollama, LM Studio."""
    home = prepare_environment()
    setup_logging()
    from tasks.machinery import gguf
    from tasks.machinery.modeling import is_adapter, materialize_adapter, resolve_model
    from tasks.machinery.context import materialize_input
    from tasks.machinery.store import ArtifactStore

    tracking_uri = tracking_uri_of(args, home)
    store = ArtifactStore(str(home / "artifacts"))
    try:
        raw = resolve_model(args.model, tracking_uri)
        local = Path(materialize_input(store, raw, tracking_uri))  # as a stage reads it (a .gguf converted first)
        if is_adapter(local):  # a LoRA output: merged into its base first
            local = materialize_adapter(local, raw["digest"], lambda base: materialize_input(store, base, tracking_uri))
        written = gguf.export(local, Path(args.gguf), args.type)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{written['file']}: {written['architecture']}, {written['type']}, {written['size_mb']:.1f} MB")
    return 0


def cmd_reproduce(args) -> int:
    import tempfile

    home = prepare_environment()
    setup_logging()
    from flows.reproduce import ReproduceError, Tolerance, compare, prepare_reproduction, read_recorded
    from tasks.machinery import hardware

    tracking_uri = tracking_uri_of(args, home)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            recorded = read_recorded(args.run_id, tracking_uri, Path(scratch))
        config, tags = prepare_reproduction(recorded, tracking_uri, args.allow_code_change, args.allow_input_change)
    except ReproduceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    moved = recorded.hardware_differences(hardware.describe())
    tolerance = Tolerance.for_hardware(bool(moved), args.rtol, args.atol)
    if moved:
        print("this machine differs from the one the run computed on:\n  " + "\n  ".join(moved)
              + "\nfloat results are bit-exact only on the same hardware, so the rerun cannot be exact: metrics are "
              f"compared within {tolerance.describe()}; output digests are shown, not required", file=sys.stderr)
        tags["posttrain.reproduce.hardware_differs"] = "; ".join(moved)[:5000]
    else:
        print(f"same hardware and versions as the recorded run: comparing with {tolerance.describe()}",
              file=sys.stderr)
    tags["posttrain.reproduce.tolerance"] = tolerance.describe()
    print(f"reproducing {args.run_id} into {config.storage.root}", file=sys.stderr)
    code, summary = run_pipeline(config, args.summary_json, home, tags, server=local_prefect_server())
    if code:
        return code
    rows = compare(recorded, summary, tolerance)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reproduction {summary['mlflow_run_id']} vs original {args.run_id}")
    for column in ("value", "original", "reproduction", "verdict"):
        table.add_column(column)
    colors = {"equal": "green", "within tolerance": "green", "differs (expected)": "yellow", "differs": "red"}
    for name, a, b, verdict in rows:
        table.add_row(name, a, b, f"[{colors[verdict]}]{verdict}")
    Console().print(table)
    differ = [r[0] for r in rows if r[3] == "differs"]
    from tasks.machinery import tracking

    tracking.set_tags(summary["tracking_uri"] if "***" not in summary["tracking_uri"] else tracking_uri,
                      summary["mlflow_run_id"], {"posttrain.reproduce.agrees": not differ})
    if differ:
        print(f"reproduction differs in {len(differ)} value(s) beyond {tolerance.describe()}: "
              f"{', '.join(differ[:10])}", file=sys.stderr)
        return 4
    if moved:
        within = sum(r[3] == "within tolerance" for r in rows)
        print(f"reproduction agrees within tolerance on other hardware: {within} metric(s) within "
              f"{tolerance.describe()}, the rest equal", file=sys.stderr)
    else:
        print("reproduction agrees with the original: every metric and every output digest is equal", file=sys.stderr)
    return 0


def cmd_server(args) -> int:
    home = prepare_environment()
    from flows.local_server import running, stop

    prefect_home = Path(os.environ["PREFECT_HOME"])
    if args.action == "stop":
        stopped = stop(prefect_home)
        print(f"stopped the local Prefect server (pid {stopped['pid']}, {stopped['ui_url']})" if stopped
              else f"no local Prefect server running for {home}")
        return 0
    state = running(prefect_home)
    print(f"local Prefect server for {home}: " + (f"pid {state['pid']}, UI {state['ui_url']}, API {state['api_url']}"
                                                  if state else "not running"))
    return 0


def cmd_deploy(args) -> int:
    prepare_environment()
    config = load_recipe(args)
    if config is None:
        return 2
    from flows.deploy import deploy_pipeline

    from flows.config import DEFAULT_RECIPE, recipe_path

    recipe = recipe_path(args.config) if args.config else DEFAULT_RECIPE
    deployment_id = deploy_pipeline(config, args.name or config.name, args.pool, args.cron, args.timezone,
                                    recipe=str(recipe), overrides=args.set or [])
    print(f"deployment posttrain/{args.name or config.name} ({deployment_id}) on work pool {args.pool!r}"
          + (f", schedule {args.cron!r} {args.timezone}" if args.cron else ", no schedule"))
    print(f"start a worker:  prefect worker start --pool {args.pool}")
    print(f"run it now:      prefect deployment run 'posttrain/{args.name or config.name}'")
    return 0
