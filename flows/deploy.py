"""Register the pipeline as a Prefect deployment: a cron schedule, a work pool, a typed parameter form.

The deployment pulls the code from this project's folder on the worker's machine (a process work
pool on a shared host, or the same path baked into an image for Docker / Kubernetes pools).
"""

from __future__ import annotations

from pathlib import Path

from flows.config import PipelineConfig

PROJECT_DIR = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/pipeline.py:post_training_pipeline"
STAGE_ENTRYPOINT = "flows/pipeline.py:run_stage_flow"


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    """Create the work pool if it does not exist yet."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            except ObjectAlreadyExists:
                pass


def deploy_pipeline(cfg: PipelineConfig, name: str, pool: str, cron: str | None = None,
                    timezone: str = "UTC", source: Path = PROJECT_DIR, pool_type: str = "process",
                    recipe: str | None = None, overrides: list[str] = ()) -> str:
    """Create or update the deployment `posttrain/<name>`, and `posttrain-stage/<pool>` for every pool named
    in orchestration.stage_pools. The run form leads with what changes per run: the recipe file and dotted
    overrides (defaults: `recipe` and `overrides`); the full typed recipe is an optional parameter below.
    A recipe given without a file (`recipe` None) becomes the `config` default."""
    from prefect import flow as prefect_flow
    from prefect.schedules import Cron

    for stage_pool in sorted(set(cfg.orchestration.stage_pools.values())):
        ensure_work_pool(stage_pool, pool_type)
        prefect_flow.from_source(source=str(source), entrypoint=STAGE_ENTRYPOINT).deploy(
            name=stage_pool, work_pool_name=stage_pool, description=f"posttrain stages sent to pool {stage_pool!r}",
            tags=["posttrain", "stage"], build=False, push=False, print_next_steps=False,
        )
    ensure_work_pool(pool, pool_type)
    remote = prefect_flow.from_source(source=str(source), entrypoint=ENTRYPOINT)
    schedules = [Cron(cron, timezone=timezone)] if cron else None
    deployment_id = remote.deploy(
        name=name,
        work_pool_name=pool,
        schedules=schedules,
        parameters=_default_parameters(cfg, recipe, overrides),
        description=f"posttrain recipe {cfg.name!r}",
        tags=["posttrain"],
        build=False,
        push=False,
        print_next_steps=False,
    )
    return str(deployment_id)


def _default_parameters(cfg: PipelineConfig, recipe: str | None, overrides: list[str]) -> dict:
    """The run form's defaults, with no credentials in them (Prefect stores and shows parameters)."""
    from tasks.machinery.tracking import strip_credentials

    if recipe is None:
        return {"config": cfg.without_credentials().model_dump(mode="json")}
    cfg.without_credentials()  # a password in tracking.uri moves to this process's environment
    path = Path(recipe).resolve()
    shown = str(path.relative_to(PROJECT_DIR)) if path.is_relative_to(PROJECT_DIR) else str(path)
    return {"recipe": shown, "overrides": [strip_credentials(o) for o in overrides]}
