"""The one generic Prefect task every stage runs under: cache key, inputs, atomic output, MLflow child run.

A stage instance of a recipe runs as `stage_task()(kind=..., instance=..., config=..., inputs=...)`;
the kind's work function (tasks/kinds.py) receives its typed config, its inputs as local folders, and
writes its output into `out`. Everything else is here:

* the cache key (tasks.cachekeys) doubles as Prefect's cache key and as the output's folder name, so
  a run with the same key anywhere reuses the output and Prefect shows the task as Cached;
* inputs arrive as references (URI + digest) and are materialized and verified locally;
* the output is committed atomically (tasks.store);
* the stage gets its own MLflow child run under the pipeline's parent run: FINISHED with its metrics,
  or FAILED with the error.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

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
    recipe: str = ""
    source_tags: dict = field(default_factory=dict)  # MLflow's source fields, set on every stage run too
    ray: dict | None = None  # orchestration.engine ray: this stage's Ray settings (tasks/ray_engine.py)
    reproduction_of: str = ""  # the pipeline run a reproduction reruns: nothing is registered or aliased

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StageContext:
    """What a stage's work function may use besides its config, inputs and output folder."""

    seed: int
    env: RunEnv | None
    run_id: str | None  # None: nothing is logged (a non-zero rank, or a plain call)
    stage: str | None = None  # the recipe instance (its round: sft, dpo.round2)
    cache_key: str | None = None
    round: int = 1  # the round of a repeated instance (rounds: N), 1 otherwise
    refs: dict = field(default_factory=dict)  # the inputs as references {slot: {uri, digest, ...}}
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

        return StoreCheckpoints(ArtifactStore(self.env.storage_root), store_area(self.cache_key), self.cache_key)

    def callbacks(self) -> list:
        from tasks.faults import step_kill_callback
        from tasks.training import metrics_callback

        stage = self.stage or "stage"
        callbacks = [metrics_callback(self.log_step, stage)] if self.run_id else []
        kill = step_kill_callback(stage)
        return callbacks + ([kill] if kill else [])


def store_area(cache_key: str) -> str:
    """Outputs live under <root>/<kind>/<cache key>: any recipe or instance with the same key finds them."""
    return cache_key.rsplit("-", 1)[0]


_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteDisconnected", "ServerDisconnectedError"}
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
# A Hub id or revision that does not exist fails the same way on every retry (the Hub raises these as
# OSErrors; transformers rewraps them as OSErrors with these messages).
_PERMANENT_HUB_ERRORS = {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "EntryNotFoundError"}
_PERMANENT_HUB_MESSAGES = ("is not a local folder and is not a valid model identifier", "is not a valid git identifier")


def _names_missing_hub_repo(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _PERMANENT_HUB_ERRORS or any(m in str(exc) for m in _PERMANENT_HUB_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: I/O and network errors, timeouts, HTTP 5xx/429 from S3 or MLflow. Not: bad config,
    bad data, missing files, a misspelled Hub id, corrupted artifacts, programming errors (they fail the same way
    again)."""
    if isinstance(exc, _PERMANENT_OS_ERRORS) or _names_missing_hub_repo(exc):
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
        logger.warning("[%s] %s: %s (%s)", task_run.name, type(exc).__name__, exc,
                       "transient, retrying" if transient else "not transient, not retrying")
        if transient:
            from tasks.faults import hold_point

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


def materialize_input(store: ArtifactStore, raw: dict, tracking_uri: str | None = None) -> Path | str:
    """A stage output from the store as a verified local folder; a data source as its reference (uri,
    digest, resolved revision); an external model as a local folder or Hub id."""
    if raw.get("kind") == "source":
        return dict(raw)
    if raw.get("gguf"):  # converted once into the store, keyed by the file's digest
        from tasks import gguf

        return gguf.materialize(store, raw)
    ref = Ref.from_dict(raw)
    # an output of this store; a model the recipe names by its path (kind "model") is read where it is, even
    # inside the store (an attempt folder of an earlier run)
    if raw.get("kind") != "model" and ref.uri.startswith(store.root_uri + "/"):
        from tasks.modeling import is_adapter, materialize_adapter

        local = store.materialize(ref)
        if is_adapter(local):  # an adapter output: merged into its base (or, prompt tuning, put on top of it)
            return materialize_adapter(local, ref.digest, lambda base: materialize_input(store, base, tracking_uri))
        return local
    from tasks.modeling import materialize_external

    return materialize_external(raw, tracking_uri)


def execute_stage(kind: str, instance: str, config: dict, inputs: dict[str, dict], seed: int, env: dict,
                  round_: int = 1, refresh: bool = False) -> dict:
    """Run one stage instance: returns {name, kind, cache_key, output, metrics, mlflow_run_id, seconds, reused}.
    `refresh` recomputes even when the store already holds an output for the key."""
    from tasks import hardware
    from tasks.cachekeys import code_files, library_versions
    from tasks.faults import hold_point
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
            from tasks import gguf

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
    from tasks import ray_engine

    ray_engine.connect(env.ray)
    tracking.set_tags(env.tracking_uri, run_id, ray_engine.cluster_tags())
    return ray_engine.active(env.ray)


def discard_checkpoints(store: ArtifactStore, area: str, key: str) -> None:
    """Once a stage's output is committed its resume checkpoints have done their job."""
    from tasks.checkpoints import StoreCheckpoints

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
    from tasks.logs import PrefectRunHandler

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
