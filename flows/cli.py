"""`posttrain` command line: run a recipe, print the per-stage table, write a JSON summary."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


def _prepare_environment() -> Path:
    """State folder and library settings; must run before Prefect, MLflow or transformers are imported."""
    home = Path(os.environ.setdefault("POSTTRAIN_HOME", ".posttrain")).expanduser().resolve()
    os.environ["POSTTRAIN_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The first start of the local server migrates its SQLite database: slow on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # a bar per map/filter call: noise
    _quiet_known_warnings()
    return home


def _quiet_known_warnings() -> None:
    """Library warnings that repeat on every run and tell the user nothing they can act on."""
    import warnings

    for message in ("The specified dataset source can be interpreted in multiple ways",
                    "Hint: Inferred schema contains integer column"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("posttrain")
    if any(getattr(h, "_posttrain", False) for h in log.handlers):
        return
    handler._posttrain = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def print_summary(summary: dict, home: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from flows.lineage import headline
    from tasks.machinery import tracking

    console = Console(stderr=False)
    table = Table(title="posttrain stages")
    for column in ("stage", "kind", "status", "seconds", "headline metrics"):
        table.add_column(column)
    colors = {"completed": "green", "cached": "cyan", "failed": "red"}
    for stage in summary["stages"]:
        shown = ", ".join(f"{k}={v:.3g}" for k, v in headline(stage).items())
        table.add_row(stage["name"], stage.get("kind", ""), f"[{colors[stage['status']]}]{stage['status']}",
                      f"{stage['seconds']:.1f}", shown or stage.get("error", "")[:120])
    console.print(table)
    console.print(f"MLflow parent run: {summary['mlflow_run_id']}   Prefect flow run: {summary['flow_run_id']}")
    uri = summary.get("tracking_uri", "")
    if uri.startswith("sqlite:"):
        page = tracking.ui_link("http://127.0.0.1:5000", summary["experiment_id"], summary["mlflow_run_id"])
        console.print(f"Open the MLflow UI:  mlflow ui --backend-store-uri {uri}   then {page}")
    elif uri:
        console.print(f"MLflow UI: {tracking.ui_link(uri, summary['experiment_id'], summary['mlflow_run_id'])}")


def _load_recipe(args):
    """The validated recipe, or None after printing the configuration error."""
    from flows.config import ConfigError, load_config

    try:
        return load_config(args.config, args.set or [])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _selection(args, config) -> dict | None:
    """--only / --from / --refresh as flow parameters, after checking they name stages of the recipe."""
    from flows.graph import build_nodes, node_names

    chosen = {"only": args.only or [], "start_from": args.start_from or [], "refresh": args.refresh or []}
    nodes = build_nodes(config)
    for flag, names in (("--only", chosen["only"]), ("--from", chosen["start_from"]), ("--refresh", chosen["refresh"])):
        for name in names:
            try:
                node_names(nodes, name)
            except KeyError as e:
                print(f"error: {flag} {e.args[0]}", file=sys.stderr)
                return None
    return chosen


def _recipe_and_selection(args):
    """(recipe, {only, start_from, refresh}), or None after printing what is wrong with them."""
    config = _load_recipe(args)
    chosen = _selection(args, config) if config is not None else None
    return None if chosen is None else (config, chosen)


def cmd_run(args) -> int:
    home = _prepare_environment()
    _setup_logging()
    loaded = _recipe_and_selection(args)
    if loaded is None:
        return 2
    config, chosen = loaded
    from flows.lineage import recipe_tags

    said = recipe_tags(args.config or "configs/demo.yaml", args.set)
    return _run_pipeline(config, args.summary_json, home, said, server=_local_prefect_server(), selection=chosen)[0]


def cmd_validate(args) -> int:
    _prepare_environment()
    config = _load_recipe(args)
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
    home = _prepare_environment()
    loaded = _recipe_and_selection(args)
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


def _tracking_uri(args, home: Path) -> str:
    """The tracking store a command reads: --tracking-uri, else $MLFLOW_TRACKING_URI, else the state folder's."""
    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow.db"


def cmd_gc(args) -> int:
    home = _prepare_environment()
    from flows.config import StorageConfig
    from flows.gc import delete, find_garbage, referenced_outputs
    from tasks.machinery.store import ArtifactStore

    root = args.storage_root or StorageConfig().root or str(home / "artifacts")
    store = ArtifactStore(root)
    tracking_uri = _tracking_uri(args, home)
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


def _local_prefect_server():
    """Without a Prefect API configured, this state folder's local server (flows/local_server.py), started
    if needed and not waited for: the heavy imports and pre-flight checks overlap its start-up."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    if "prefect" in sys.modules:  # imported already (a test harness, a notebook): keep its settings
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return None
    from flows.local_server import start_or_find

    server = start_or_find(Path(os.environ["PREFECT_HOME"]))
    os.environ["PREFECT_API_URL"] = server.api_url
    if server.started_here:
        print(f"started a local Prefect server for {os.environ['POSTTRAIN_HOME']} (kept for later runs; "
              f"`posttrain server stop` stops it); UI: {server.state['ui_url']}", file=sys.stderr)
    return server


def _prefect_api(server):
    """Point Prefect at the local server (Prefect reads PREFECT_API_URL when it is imported)."""
    from contextlib import nullcontext

    if server is None:
        return nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server.api_url})


def _warm_up(config) -> None:
    """Import torch and open (on a first run: create) the MLflow store."""
    from tasks.machinery import hardware, tracking

    hardware.describe()
    tracking.open_store(config.resolved().tracking.uri)


def _run_pipeline(config, summary_json: str | None, home: Path, run_tags: dict | None = None,
                  server=None, selection: dict | None = None) -> tuple[int, dict]:
    from flows.pipeline import PipelineFailed, post_training_pipeline
    from flows.preflight import PreflightError, preflight

    try:
        preflight(config)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, {}

    if server is not None:
        from flows.local_server import LocalServerError

        _warm_up(config)  # what the run does first anyway, while the server starts
        try:
            server.wait()
        except LocalServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1, {}
    try:
        with _prefect_api(server):
            summary = post_training_pipeline(config=config.without_credentials(), run_tags=run_tags,
                                             **(selection or {}))
        code = 0
    except PipelineFailed as e:
        summary, code = e.summary, 1
        print(f"error: {e}", file=sys.stderr)
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary, home)
    ok = all(s["status"] in ("completed", "cached") for s in summary["stages"])
    return (code if code else (0 if ok else 1)), summary


def cmd_compare(args) -> int:
    import tempfile

    home = _prepare_environment()
    from flows.compare import compare_runs, print_comparison, read_both
    from flows.reproduce import ReproduceError

    tracking_uri = _tracking_uri(args, home)
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
    home = _prepare_environment()
    from tasks.machinery import tracking

    tracking_uri = _tracking_uri(args, home)
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
    home = _prepare_environment()
    _setup_logging()
    from tasks.machinery import gguf
    from tasks.machinery.modeling import is_adapter, materialize_adapter, resolve_model
    from tasks.stage import materialize_input
    from tasks.machinery.store import ArtifactStore

    tracking_uri = _tracking_uri(args, home)
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

    home = _prepare_environment()
    _setup_logging()
    from flows.reproduce import ReproduceError, Tolerance, compare, prepare_reproduction, read_recorded
    from tasks.machinery import hardware

    tracking_uri = _tracking_uri(args, home)
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
    code, summary = _run_pipeline(config, args.summary_json, home, tags, server=_local_prefect_server())
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
    home = _prepare_environment()
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
    _prepare_environment()
    config = _load_recipe(args)
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


def _tracking_uri_option(command) -> None:
    command.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the state "
                         "folder's)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain", description="LLM post-training as a cached Prefect flow.")
    parser.add_argument("--version", action="version", version=f"posttrain {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_arguments(command, selecting: bool = True):
        command.add_argument("--config", help="YAML recipe (default: configs/demo.yaml)")
        command.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. align.beta=0.2")
        if selecting:
            command.add_argument("--only", action="append", metavar="STAGE",
                                 help="run only this stage (repeatable); the stages it reads must be in the store")
            command.add_argument("--from", dest="start_from", action="append", metavar="STAGE",
                                 help="run this stage and everything downstream of it (repeatable)")
            command.add_argument("--refresh", action="append", metavar="STAGE",
                                 help="recompute this stage even if its output is cached (repeatable)")

    run = sub.add_parser("run", help="run a recipe's stages (default: configs/demo.yaml)")
    recipe_arguments(run)
    run.add_argument("--summary-json", metavar="PATH", help="write the run summary as JSON")
    run.set_defaults(func=cmd_run)
    plan = sub.add_parser("plan", help="show each stage's cache key and whether it would run or come from the "
                          "store, and why, without running anything")
    recipe_arguments(plan)
    plan.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    plan.set_defaults(func=cmd_plan)
    validate = sub.add_parser("validate", help="check a recipe (settings and stage graph) and print its stages")
    recipe_arguments(validate, selecting=False)
    validate.set_defaults(func=cmd_validate)
    gc = sub.add_parser("gc", help="find what the artifact store keeps but no run needs (dry run; --yes deletes)")
    gc.add_argument("--storage-root", help="artifact store root (default: $POSTTRAIN_HOME/artifacts)")
    gc.add_argument("--tracking-uri", help="MLflow tracking URI whose runs reference outputs (default: the state folder's)")
    gc.add_argument("--keep-days", type=float, default=30.0,
                    help="keep committed outputs that a stage run of the last N days names (0: keep all outputs)")
    gc.add_argument("--min-age-hours", type=float, default=24.0,
                    help="leave uncommitted attempts younger than this alone (a stage may be writing them)")
    gc.add_argument("--yes", action="store_true", help="delete what is listed")
    gc.set_defaults(func=cmd_gc)
    rep = sub.add_parser("reproduce", help="rerun a past pipeline run from what MLflow holds and compare")
    rep.add_argument("run_id", help="the MLflow run id of the pipeline (parent) run")
    _tracking_uri_option(rep)
    rep.add_argument("--summary-json", metavar="PATH", help="write the reproduction's run summary as JSON")
    rep.add_argument("--allow-code-change", action="store_true",
                     help="rerun even if the source or library versions differ from the recorded ones")
    rep.add_argument("--allow-input-change", action="store_true",
                     help="rerun even if an input data set's digest differs from the recorded one")
    rep.add_argument("--rtol", type=float, default=None,
                     help="relative tolerance for metrics (default: 0 on the recorded hardware, 0.1 on other hardware)")
    rep.add_argument("--atol", type=float, default=None,
                     help="absolute tolerance for metrics (default: 0 on the recorded hardware, 0.05 on other hardware)")
    rep.set_defaults(func=cmd_reproduce)
    pro = sub.add_parser("promote", help="make the model a past run registered the champion, by hand")
    pro.add_argument("run_id", help="the MLflow run id of the pipeline (parent) run")
    pro.add_argument("--stage", help="the stage whose registered model to promote (default: the run's promote stage)")
    _tracking_uri_option(pro)
    pro.set_defaults(func=cmd_promote)
    export = sub.add_parser("export", help="write a model (folder, stage output, models:/name@alias) as a GGUF file")
    export.add_argument("model", help="the model: a save_pretrained folder, a stage output, models:/name@champion, "
                        "an s3:// URI or a Hub id")
    export.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    export.add_argument("--type", default="f16", choices=("f32", "f16", "q8_0"),
                        help="weight type: f16 (default), f32, or q8_0 (8-bit, a quarter of fp32)")
    _tracking_uri_option(export)
    export.set_defaults(func=cmd_export)
    cmp = sub.add_parser("compare", help="what differs between two pipeline runs: settings, code, data, metrics")
    cmp.add_argument("run_a", help="the MLflow run id of a pipeline (parent) run")
    cmp.add_argument("run_b", help="the MLflow run id of another pipeline run; deltas are B - A")
    _tracking_uri_option(cmp)
    cmp.add_argument("--json", metavar="PATH", help="write the comparison as JSON instead of printing tables")
    cmp.add_argument("--all-metrics", action="store_true", help="list every metric, not only those that differ")
    cmp.set_defaults(func=cmd_compare)
    server = sub.add_parser("server", help="the local Prefect server kept for this state folder: status or stop")
    server.add_argument("action", choices=("status", "stop"))
    server.set_defaults(func=cmd_server)
    deploy = sub.add_parser("deploy", help="register the recipe as a scheduled Prefect deployment")
    deploy.add_argument("--config", help="YAML recipe (default: configs/demo.yaml): the run form's default")
    deploy.add_argument("--set", action="append", metavar="KEY=VALUE", help="an override every run starts with")
    deploy.add_argument("--name", help="deployment name (default: the recipe's name)")
    deploy.add_argument("--pool", default="posttrain", help="work pool (created as a process pool if missing)")
    deploy.add_argument("--cron", help="cron schedule, e.g. '0 3 * * *' (default: no schedule)")
    deploy.add_argument("--timezone", default="UTC", help="time zone of the cron schedule")
    deploy.set_defaults(func=cmd_deploy)
    args = parser.parse_args(argv)
    return args.func(args)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("posttrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def entry() -> None:
    """The `posttrain` command: main(), then exit without the interpreter's final garbage collections over
    every library object (about 2 s on 2 cores); everything is written and Prefect's logs are flushed by
    then. (main() alone, called from a notebook or a test, leaves the collector alone.)"""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
