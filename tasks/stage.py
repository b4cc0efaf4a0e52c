"""The part every stage's thin Prefect task shares: cache key, inputs, atomic output, MLflow child run.

A stage task is `stage_task(name, work)`, where `work(config, inputs, out, ctx) -> metrics` receives
its inputs as local folders and writes its output into `out`. Everything else is here:

* the cache key (tasks.cachekeys) doubles as Prefect's cache key and as the output's folder name, so
  a run with the same key anywhere reuses the output and Prefect shows the task as Cached;
* inputs arrive as references (URI + digest) and are materialized and verified locally;
* the output is committed atomically (tasks.store);
* the stage gets its own MLflow child run under the pipeline's parent run: FINISHED with its metrics,
  or FAILED with the error.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tasks import tracking
from tasks.cachekeys import stage_cache_key
from tasks.store import ArtifactStore, Ref

logger = logging.getLogger("posttrain")


@dataclass
class RunEnv:
    """Where a pipeline run keeps things. Not part of any cache key."""

    storage_root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trust_remote_code: bool = False
    log_model_max_mb: float = 500.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StageContext:
    """What a stage's work function may use besides its config, inputs and output folder."""

    seed: int
    env: RunEnv | None
    run_id: str | None  # None: nothing is logged (a non-zero rank, or a plain call)
    stage: str | None = None
    cache_key: str | None = None
    pending: list = field(default_factory=list)  # curve points being logged in the background

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.env and self.env.trust_remote_code)

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        """A point of the training curve, logged in the background so that training does not wait for
        the tracking store (a SQLite commit or an HTTP call per logged step); see flush()."""
        if self.run_id and self.env:
            self.pending.append(tracking.log_metrics(self.env.tracking_uri, self.run_id, metrics, step,
                                                     synchronous=False))

    def flush(self) -> None:
        """Wait until every curve point is in the tracking store (raises if one could not be logged)."""
        while self.pending:
            self.pending.pop(0).wait()

    def checkpoints(self, training):
        """Store-backed checkpoints when training.checkpoint_steps is set and the stage has a store and key."""
        if not training.checkpoint_steps or not (self.env and self.stage and self.cache_key):
            return None
        from tasks.checkpoints import StoreCheckpoints

        return StoreCheckpoints(ArtifactStore(self.env.storage_root), self.stage, self.cache_key)

    def callbacks(self, stage: str) -> list:
        from tasks.faults import step_kill_callback
        from tasks.training import metrics_callback

        callbacks = [metrics_callback(self.log_step, stage)] if self.run_id else []
        kill = step_kill_callback(stage)
        return callbacks + ([kill] if kill else [])


_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteDisconnected", "ServerDisconnectedError"}
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: I/O and network errors, timeouts, HTTP 5xx/429 from S3 or MLflow. Not: bad config,
    bad data, missing files, corrupted artifacts, programming errors (they fail the same way again)."""
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    if type(exc).__name__ in _TRANSIENT_NAMES:
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is None and isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if status is not None and (int(status) >= 500 or int(status) == 429):
        return True
    if getattr(exc, "error_code", None) in _TRANSIENT_MLFLOW_CODES:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry a failed stage only when its error is transient."""
    try:
        state.result()
    except BaseException as exc:  # the task's exception
        transient = is_transient(exc)
        logger.warning("[%s] %s: %s (%s)", task.name, type(exc).__name__, exc,
                       "transient, retrying" if transient else "not transient, not retrying")
        if transient:
            from tasks.faults import hold_point

            hold_point(f"{task.name}:retry")
        return transient
    return False


Work = Callable[[dict, dict[str, Any], Path, StageContext], dict[str, float]]


def cache_key_for(stage: str, parameters: dict) -> str:
    digests = {name: ref["digest"] for name, ref in parameters["inputs"].items()}
    return stage_cache_key(stage, parameters["config"], digests, parameters["seed"])


def materialize_input(store: ArtifactStore, raw: dict) -> Path | str:
    """A stage output from the store as a verified local folder; a data source as its URI; an external
    model as a local folder or Hub id."""
    if raw.get("kind") == "source":
        return raw["uri"]
    ref = Ref.from_dict(raw)
    if ref.uri.startswith(store.root_uri + "/"):
        return store.materialize(ref)
    from tasks.modeling import materialize_external

    return materialize_external(ref)


def execute_stage(stage: str, work: Work, config: dict, inputs: dict[str, dict], seed: int, env: dict) -> dict:
    """Run one stage: returns {name, cache_key, output, metrics, mlflow_run_id, seconds, reused}."""
    run_env = RunEnv(**env)
    key = cache_key_for(stage, {"config": config, "inputs": inputs, "seed": seed})
    store = ArtifactStore(run_env.storage_root)
    refs = {name: Ref.from_dict(r) for name, r in inputs.items()}
    from tasks import hardware

    run_id = tracking.start_run(
        run_env.tracking_uri, run_env.experiment_id, stage,
        {tracking.TAG_STAGE: stage, tracking.TAG_CACHE_KEY: key, tracking.TAG_CACHED: "false", "posttrain.seed": seed,
         **hardware.as_tags(hardware.describe())},
        parent_run_id=run_env.parent_run_id,
    )
    started = time.monotonic()
    ctx = StageContext(seed=seed, env=run_env, run_id=run_id, stage=stage, cache_key=key)
    try:
        tracking.log_params(run_env.tracking_uri, run_id, tracking.flatten(tracking.redact(config)))
        tracking.set_tags(run_env.tracking_uri, run_id,
                          {f"posttrain.input.{n}": f"{r.uri}@{r.digest[:16]}" for n, r in refs.items()})
        local = {name: materialize_input(store, raw) for name, raw in inputs.items()}
        existing = store.lookup(stage, key)
        if existing is not None:
            # Committed by an earlier run whose Prefect result record is gone: reuse, do not retrain.
            logger.info("[%s] output for %s already in the store; reusing it", stage, key)
            output, metrics = existing, store.read_manifest(existing.uri)["metadata"].get("metrics", {})
        else:
            logger.info("[%s] running (cache key %s)", stage, key)
            with store.write(stage, key) as pending:
                metrics = work(config, local, pending.path, ctx)
                ctx.flush()
                pending.metadata = {"metrics": metrics, "mlflow_run_id": run_id, "config": config,
                                    "inputs": {n: r.to_dict() for n, r in refs.items()}, "seed": seed}
            output = pending.ref
            discard_checkpoints(store, stage, key)
            if pending.superseded_by is not None:  # a concurrent run with the same key committed first
                logger.info("[%s] another run committed %s first; using its output", stage, key)
                existing, metrics = output, pending.superseded_by["metadata"].get("metrics", metrics)
        seconds = time.monotonic() - started
        tracking.log_metrics(run_env.tracking_uri, run_id, {**metrics, "stage/seconds": seconds})
        tracking.set_tags(run_env.tracking_uri, run_id, {"posttrain.output_uri": output.uri,
                                                         "posttrain.output_digest": output.digest,
                                                         "posttrain.reused_output": existing is not None})
    except BaseException as exc:
        tracking.end_run(run_env.tracking_uri, run_id, failed=True,
                         error="".join(traceback.format_exception_only(type(exc), exc)).strip())
        raise
    tracking.end_run(run_env.tracking_uri, run_id)
    return {
        "name": stage,
        "cache_key": key,
        "output": output.to_dict(),
        "metrics": metrics,
        "mlflow_run_id": run_id,
        "seconds": round(seconds, 3),
        "reused": existing is not None,
    }


def discard_checkpoints(store: ArtifactStore, stage: str, key: str) -> None:
    """Once a stage's output is committed its resume checkpoints have done their job."""
    from tasks.checkpoints import StoreCheckpoints

    StoreCheckpoints(store, stage, key).prune(keep=0)


def record_cached_stage(result: dict, env: dict) -> str:
    """Give a stage that came from cache its child run in this pipeline run, pointing at its origin."""
    run_env = RunEnv(**env)
    run_id = tracking.start_run(
        run_env.tracking_uri, run_env.experiment_id, result["name"],
        {tracking.TAG_STAGE: result["name"], tracking.TAG_CACHE_KEY: result["cache_key"],
         tracking.TAG_CACHED: "true", tracking.TAG_CACHED_FROM: result["mlflow_run_id"],
         "posttrain.output_uri": result["output"]["uri"], "posttrain.output_digest": result["output"]["digest"]},
        parent_run_id=run_env.parent_run_id,
    )
    tracking.log_metrics(run_env.tracking_uri, run_id, {**result["metrics"], "stage/seconds": 0.0})
    tracking.end_run(run_env.tracking_uri, run_id)
    return run_id


def stage_task(stage: str, work: Work, **task_options):
    """The thin Prefect task for a stage: cached across runs on the stage's own cache key."""
    from prefect import task

    def run(config: dict, inputs: dict[str, dict], seed: int, env: dict) -> dict:
        return execute_stage(stage, work, config, inputs, seed, env)

    run.__name__ = run.__qualname__ = f"run_{stage}"
    return task(
        run,
        name=stage,
        cache_key_fn=lambda _ctx, parameters: cache_key_for(stage, parameters),
        retry_condition_fn=retry_if_transient,
        persist_result=True,
        result_serializer="json",
        **task_options,
    )
