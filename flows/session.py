"""What every `posttrain` command sets up and shares: the state folder and library settings (before Prefect,
MLflow or transformers are imported), the console log, the recipe and stage selection from the command line,
the local Prefect server, running the pipeline flow and printing its per-stage table."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def prepare_environment() -> Path:
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
    quiet_known_warnings()
    return home


def quiet_known_warnings() -> None:
    """Library warnings that repeat on every run and tell the user nothing they can act on."""
    import warnings

    for message in ("The specified dataset source can be interpreted in multiple ways",
                    "Hint: Inferred schema contains integer column"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def setup_logging() -> None:
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


def load_recipe(args):
    """The validated recipe, or None after printing the configuration error."""
    from flows.config import ConfigError, load_config

    try:
        return load_config(args.config, args.set or [])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def selection(args, config) -> dict | None:
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


def recipe_and_selection(args):
    """(recipe, {only, start_from, refresh}), or None after printing what is wrong with them."""
    config = load_recipe(args)
    chosen = selection(args, config) if config is not None else None
    return None if chosen is None else (config, chosen)


def tracking_uri_of(args, home: Path) -> str:
    """The tracking store a command reads: --tracking-uri, else $MLFLOW_TRACKING_URI, else the state folder's."""
    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow.db"


def local_prefect_server():
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


def prefect_api(server):
    """Point Prefect at the local server (Prefect reads PREFECT_API_URL when it is imported)."""
    from contextlib import nullcontext

    if server is None:
        return nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server.api_url})


def warm_up(config) -> None:
    """Import torch and open (on a first run: create) the MLflow store."""
    from tasks.machinery import hardware, tracking

    hardware.describe()
    tracking.open_store(config.resolved().tracking.uri)


def run_pipeline(config, summary_json: str | None, home: Path, run_tags: dict | None = None,
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

        warm_up(config)  # what the run does first anyway, while the server starts
        try:
            server.wait()
        except LocalServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1, {}
    try:
        with prefect_api(server):
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
