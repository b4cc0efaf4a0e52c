"""The one generic Prefect task every stage runs under: cache key, inputs, atomic output, MLflow child run.

A stage instance of a recipe runs as `stage_task()(kind=..., instance=..., config=..., inputs=...)`;
the kind's work function (tasks/kinds/<kind>.py) receives its typed config, its inputs as local folders, and
writes its output into `out`. Everything else is here:

* the cache key (tasks.machinery.cachekeys) doubles as Prefect's cache key and as the output's folder name, so
  a run with the same key anywhere reuses the output and Prefect shows the task as Cached;
* inputs arrive as references (URI + digest) and are materialized and verified locally;
* the output is committed atomically (tasks.machinery.store);
* the stage gets its own MLflow child run under the pipeline's parent run: FINISHED with its metrics,
  or FAILED with the error.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from functools import lru_cache

from tasks.machinery import tracking
from tasks.machinery.cachekeys import stage_cache_key
from tasks.machinery.context import RunEnv, StageContext, is_transient, materialize_input, store_area
from tasks.machinery.store import ArtifactStore, Ref

logger = logging.getLogger("posttrain")


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry a failed stage only when its error is transient."""
    try:
        state.result()
    except BaseException as exc:  # the task's exception
        transient = is_transient(exc)
        logger.warning("[%s] %s: %s (%s)", task_run.name, type(exc).__name__, exc,
                       "transient, retrying" if transient else "not transient, not retrying")
        if transient:
            from tasks.machinery.faults import hold_point

            hold_point(f"{task_run.name}:retry")
        return transient
    return False


def cache_key_for(kind: str, parameters: dict) -> str:
    from tasks.kinds import get

    digests = {name: ref["digest"] for name, ref in parameters["inputs"].items()}
    config = parameters["config"]
    if get(kind).acts_on_world:  # what it acts on is named after the recipe (<recipe>-policy): another recipe's
        config = {**config, "_recipe": parameters["env"].get("recipe", "")}  # decision is not this one's
    return stage_cache_key(kind, config, digests, parameters["seed"], parameters.get("round", 1))


def execute_stage(kind: str, instance: str, config: dict, inputs: dict[str, dict], seed: int, env: dict,
                  round_: int = 1, refresh: bool = False) -> dict:
    """Run one stage instance: returns {name, kind, cache_key, output, metrics, mlflow_run_id, seconds, reused}.
    `refresh` recomputes even when the store already holds an output for the key."""
    from tasks.machinery import hardware
    from tasks.machinery.cachekeys import code_files, library_versions
    from tasks.machinery.faults import hold_point
    from tasks.kinds import get

    hold_point(f"{instance}:start")  # lets a test act once a stage has started (POSTTRAIN_HOLD_AT)
    stage_kind = get(kind)
    cfg = stage_kind.config.model_validate(config)  # parsed once; the work function gets the typed config
    run_env = RunEnv(**env)
    key = cache_key_for(kind, {"config": config, "inputs": inputs, "seed": seed, "round": round_, "env": env})
    area = store_area(key)
    store = ArtifactStore(run_env.storage_root)
    refs = {name: Ref.from_dict(r) for name, r in inputs.items()}
    run_id = tracking.start_run(
        run_env.tracking_uri, run_env.experiment_id, instance,
        {tracking.TAG_STAGE: instance, tracking.TAG_KIND: kind, tracking.TAG_CACHE_KEY: key,
         tracking.TAG_CACHED: "false", "posttrain.seed": seed, **hardware.as_tags(hardware.describe()),
         **run_env.source_tags},
        parent_run_id=run_env.parent_run_id,
    )
    logger.info("[%s] MLflow run %s", instance, tracking.run_link(run_env.tracking_uri, run_env.experiment_id, run_id))
    started = time.monotonic()
    system = tracking.SystemMetrics(run_env.tracking_uri, run_id)
    ctx = StageContext(seed=seed, env=run_env, run_id=run_id, stage=instance, cache_key=key, round=round_,
                       refs=dict(inputs))
    try:
        tracking.log_params(run_env.tracking_uri, run_id, tracking.flatten(tracking.redact(config)))
        tracking.set_tags(run_env.tracking_uri, run_id, input_tags(inputs))
        timings: dict[str, float] = {}  # where a stage's seconds go, beside its trainer's

        def lap(phase: str) -> None:
            timings[phase] = time.monotonic() - started - sum(timings.values())

        lap("setup")
        local = {name: materialize_input(store, raw, run_env.tracking_uri) for name, raw in inputs.items()}
        lap("inputs")
        if any(raw.get("gguf") for raw in inputs.values()):
            from tasks.machinery import gguf

            tracking.set_tags(run_env.tracking_uri, run_id, {k: v for n, raw in inputs.items() if raw.get("gguf")
                                                             for k, v in gguf.input_tags(n, local[n]).items()})
        existing = store.lookup(area, key)
        if existing is not None and refresh:
            aside = store.quarantine(existing.uri, "recomputed on request (--refresh)")
            logger.info("[%s] recomputing %s on request; the earlier output's manifest is at %s", instance, key, aside)
            existing = None
        if existing is not None:
            # Committed by an earlier run whose Prefect result record is gone: reuse, do not retrain.
            logger.info("[%s] output for %s already in the store; reusing it", instance, key)
            output, metrics = existing, store.read_manifest(existing.uri)["metadata"].get("metrics", {})
        else:
            logger.info("[%s] running %s (cache key %s)", instance, kind, key)
            work = stage_kind.replay if run_env.reproduction_of and stage_kind.acts_on_world else stage_kind.work
            with store.write(area, key) as pending, _engine(run_env, run_id):
                metrics = work(cfg, local, pending.path, ctx)
                ctx.flush()
                lap("work")
                pending.metadata = {
                    "metrics": metrics, "mlflow_run_id": run_id, "config": config, "seed": seed, "round": round_,
                    "inputs": {n: r.to_dict() for n, r in refs.items()}, "kind": kind, "instance": instance,
                    "recipe": run_env.recipe, "code": code_files(stage_kind.module), "libraries": library_versions(),
                    "committed_at": time.time(),
                }
            output = pending.ref
            discard_checkpoints(store, area, key)
            if pending.superseded_by is not None:  # a concurrent run with the same key committed first
                logger.info("[%s] another run committed %s first; using its output", instance, key)
                existing, metrics = output, pending.superseded_by["metadata"].get("metrics", metrics)
        if "work" in timings:
            lap("commit")  # hashing the output, the manifest, the rename
        seconds = time.monotonic() - started
        # at the last training step, so a summary number that is also a curve (eval/loss) is that curve's end
        tracking.log_metrics(run_env.tracking_uri, run_id, {**metrics, "stage/seconds": seconds,
                                                            **{f"stage/seconds/{k}": v for k, v in timings.items()}},
                             step=int(metrics.get(stage_kind.step, 0)))
        tracking.set_tags(run_env.tracking_uri, run_id, {"posttrain.output_uri": output.uri,
                                                         "posttrain.output_digest": output.digest,
                                                         "posttrain.reused_output": existing is not None})
    except BaseException as exc:
        system.stop()
        tracking.end_run(run_env.tracking_uri, run_id, failed=True,
                         error="".join(traceback.format_exception_only(type(exc), exc)).strip())
        raise
    system.stop()
    tracking.end_run(run_env.tracking_uri, run_id)
    return {
        "name": instance,
        "kind": kind,
        "cache_key": key,
        "output": output.to_dict(),
        "metrics": metrics,
        "mlflow_run_id": run_id,
        "seconds": round(seconds, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "reused": existing is not None,
    }


def _engine(env: RunEnv, run_id: str):
    """Where the stage's heavy work runs: here, or on its Ray cluster (training and generation), whose job and
    dashboard the stage's MLflow run then links to."""
    if not env.ray:
        return contextlib.nullcontext()
    from tasks.machinery import ray_engine

    ray_engine.connect(env.ray)
    tracking.set_tags(env.tracking_uri, run_id, ray_engine.cluster_tags())
    return ray_engine.active(env.ray)


def discard_checkpoints(store: ArtifactStore, area: str, key: str) -> None:
    """Once a stage's output is committed its resume checkpoints have done their job."""
    from tasks.machinery.checkpoints import StoreCheckpoints

    StoreCheckpoints(store, area, key).prune(keep=0)


def input_tags(inputs: dict[str, dict]) -> dict[str, str]:
    """A stage run's tags naming its inputs (URI @ digest) and, for a Hub model or data set, its resolved commit."""
    return ({f"posttrain.input.{n}": f"{raw['uri']}@{raw['digest'][:16]}" for n, raw in inputs.items()}
            | {f"posttrain.input.{n}.revision": raw["revision"] for n, raw in inputs.items() if raw.get("revision")})


def record_cached_stage(result: dict, instance: str, env: dict, inputs: dict[str, dict] | None = None) -> str:
    """Give a stage that came from cache its child run in this pipeline run, pointing at its origin and naming
    the same inputs a computed stage's run does."""
    run_env = RunEnv(**env)
    run_id = tracking.start_run(
        run_env.tracking_uri, run_env.experiment_id, instance,
        {tracking.TAG_STAGE: instance, tracking.TAG_KIND: result["kind"], tracking.TAG_CACHE_KEY: result["cache_key"],
         tracking.TAG_CACHED: "true", tracking.TAG_CACHED_FROM: result["mlflow_run_id"] or "",
         "posttrain.output_uri": result["output"]["uri"], "posttrain.output_digest": result["output"]["digest"],
         **run_env.source_tags},
        parent_run_id=run_env.parent_run_id,
    )
    if inputs:
        tracking.set_tags(run_env.tracking_uri, run_id, input_tags(inputs))
    if result["mlflow_run_id"]:
        try:
            tracking.copy_dataset_inputs(run_env.tracking_uri, [result["mlflow_run_id"]], run_id)
        except Exception as e:  # noqa: BLE001 - the origin run may be gone (another store, deleted)
            logger.info("[%s] data sets of the cached run not copied: %s", instance, e)
    from tasks.kinds import get

    tracking.log_metrics(run_env.tracking_uri, run_id, {**result["metrics"], "stage/seconds": 0.0},
                         step=int(result["metrics"].get(get(result["kind"]).step, 0)))
    tracking.end_run(run_env.tracking_uri, run_id)
    return run_id


@lru_cache(maxsize=None)
def stage_task():
    """The Prefect task every stage instance runs as, cached across runs on the stage's cache key; the
    flow names each task run after its recipe instance (`with_options(task_run_name=...)`)."""
    from prefect import task

    def run_stage(kind: str, instance: str, config: dict, inputs: dict[str, dict], seed: int, env: dict,
                  round: int = 1, refresh: bool = False) -> dict:
        with forward_logs_to_prefect():
            return execute_stage(kind, instance, config, inputs, seed, env, round, refresh)

    return task(
        run_stage,
        name="stage",
        cache_key_fn=lambda _ctx, parameters: cache_key_for(parameters["kind"], parameters),
        retry_condition_fn=retry_if_transient,
        persist_result=True,
        result_serializer="json",
    )


@contextlib.contextmanager
def forward_logs_to_prefect():
    """The stage's progress lines (posttrain logger) also go to the Prefect run's logs, where the UI shows
    them; the console keeps its one line per step."""
    from tasks.machinery.logs import PrefectRunHandler

    handler = PrefectRunHandler()
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:  # a worker's flow-run process configures no posttrain logging
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
