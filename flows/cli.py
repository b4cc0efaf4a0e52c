"""`posttrain` command line: the argument parser; the commands are in flows/commands.py, what they share in
flows/session.py."""

from __future__ import annotations

import argparse
import sys

from flows.commands import (cmd_compare, cmd_deploy, cmd_export, cmd_gc, cmd_plan, cmd_promote, cmd_reproduce,
                            cmd_run, cmd_server, cmd_validate)


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
