"""What a stage's work runs with: where the run keeps things (`RunEnv`), the stage's context (`StageContext`:
seed, MLflow run, curve logging, checkpoints, callbacks), its inputs made local (`materialize_input`), and
which errors are worth retrying (`is_transient`). Shared by the generic stage task (tasks/stage.py), the
launchers and the kinds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tasks.machinery import tracking
from tasks.machinery.store import ArtifactStore, Ref

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
    ray: dict | None = None  # orchestration.engine ray: this stage's Ray settings (tasks/machinery/ray_engine.py)
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
        from tasks.machinery.checkpoints import StoreCheckpoints

        return StoreCheckpoints(ArtifactStore(self.env.storage_root), store_area(self.cache_key), self.cache_key)

    def callbacks(self) -> list:
        from tasks.machinery.faults import step_kill_callback
        from tasks.machinery.training import metrics_callback

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


def materialize_input(store: ArtifactStore, raw: dict, tracking_uri: str | None = None) -> Path | str:
    """A stage output from the store as a verified local folder; a data source as its reference (uri,
    digest, resolved revision); an external model as a local folder or Hub id."""
    if raw.get("kind") == "source":
        return dict(raw)
    if raw.get("gguf"):  # converted once into the store, keyed by the file's digest
        from tasks.machinery import gguf

        return gguf.materialize(store, raw)
    ref = Ref.from_dict(raw)
    # an output of this store; a model the recipe names by its path (kind "model") is read where it is, even
    # inside the store (an attempt folder of an earlier run)
    if raw.get("kind") != "model" and ref.uri.startswith(store.root_uri + "/"):
        from tasks.machinery.modeling import is_adapter, materialize_adapter

        local = store.materialize(ref)
        if is_adapter(local):  # an adapter output: merged into its base (or, prompt tuning, put on top of it)
            return materialize_adapter(local, ref.digest, lambda base: materialize_input(store, base, tracking_uri))
        return local
    from tasks.machinery.modeling import materialize_external

    return materialize_external(raw, tracking_uri)
