"""MLflow lineage: one parent run per pipeline run, one child run per stage, always by explicit run id.

MLflow's active-run stack is thread-local and Prefect may run tasks in worker threads, so nothing
here relies on `mlflow.active_run()`.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value
_BAD_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
TAG_STAGE = "posttrain.stage"
TAG_CACHED = "posttrain.cached"
TAG_CACHED_FROM = "posttrain.cached_from_run"
TAG_CACHE_KEY = "posttrain.cache_key"
TAG_KIND = "posttrain.kind"


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SECRET_KEY = re.compile(
    r"(^|[_.-])(secret|password|passwd|token|api[_-]?key|access[_-]?key|secret[_-]?key|credentials?)$", re.IGNORECASE
)


def redact(value: Any) -> Any:
    """A copy with passwords inside URIs and values of secret-looking keys replaced by '***'."""
    if isinstance(value, dict):
        return {k: "***" if _SECRET_KEY.search(str(k)) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _USERINFO.sub(lambda m: f"{m['scheme']}***@", value)
    return value


def strip_credentials(uri: str) -> str:
    """The URI without its user:password@ part: what may be stored in Prefect parameters or shown."""
    return _USERINFO.sub(lambda m: m["scheme"], uri)


def with_local_credentials(uri: str) -> str:
    """`uri` with the credentials this process's own environment holds for the same server
    (MLFLOW_TRACKING_URI with user:password@), else `uri` unchanged. Credentials travel in each
    process's environment (or MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, which MLflow reads
    itself), never in Prefect parameters."""
    import os

    local = os.environ.get("MLFLOW_TRACKING_URI", "")
    if local != strip_credentials(local) and strip_credentials(local).rstrip("/") == strip_credentials(uri).rstrip("/"):
        return local
    return uri


# The MLflow UI (3.x) opens an experiment on its GenAI pages unless the link asks for the model-training view
# (the experiment's mlflow.experimentKind tag is not enough there); every link posttrain prints asks for it.
TRAINING_VIEW = "?workflowType=machine_learning"


def ui_link(server: str, experiment_id: str, run_id: str | None = None) -> str:
    """An experiment's (or run's) page in the MLflow UI at `server`, in the model-training view."""
    page = f"{server.rstrip('/')}/#/experiments/{experiment_id}"
    return (f"{page}/runs/{run_id}" if run_id else page) + TRAINING_VIEW


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a user opens a run: its page on a tracking server, or the command that serves a local store."""
    uri = strip_credentials(tracking_uri)
    if uri.startswith(("http://", "https://")):
        return ui_link(uri, experiment_id, run_id)
    return f"{run_id} (open with: mlflow ui --backend-store-uri {uri})"


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def sanitize_metric_name(name: str) -> str:
    """MLflow accepts letters, digits, '_', '-', '.', ' ' and '/'; anything else becomes '_'."""
    return _BAD_METRIC_CHARS.sub("_", name).strip("/") or "_"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def open_store(tracking_uri: str) -> None:
    """Open the tracking store once. A local SQLite store is created (or migrated) on first open; two runs
    doing that at once would race on its schema, so the first open holds a lock beside the database."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    import fcntl

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client(tracking_uri).search_experiments(max_results=1)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    open_store(tracking_uri)
    c = client(tracking_uri)
    experiment = c.get_experiment_by_name(name)
    if experiment is None:
        try:
            c.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
        except Exception:  # created concurrently by another run
            pass
        experiment = c.get_experiment_by_name(name)
    elif EXPERIMENT_KIND_TAG not in experiment.tags:
        c.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_TAGS[EXPERIMENT_KIND_TAG])
    return experiment.experiment_id


# The MLflow UI opens an experiment of this kind on its training runs (not on the GenAI traces page).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}


def start_run(tracking_uri: str, experiment_id: str, name: str, tags: dict[str, str],
              parent_run_id: str | None = None) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    all_tags = {MLFLOW_RUN_NAME: name, **{k: str(v) for k, v in tags.items()}}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return client(tracking_uri).create_run(experiment_id, tags=all_tags, run_name=name).info.run_id


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches. A value over MLflow's length limit is cut with a marker saying where the
    whole value is (the resolved config artifact) and listed in a tag, never dropped."""
    from mlflow.entities import Param

    c = client(tracking_uri)
    cut = []
    items = []
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if len(text) > MAX_PARAM_CHARS:
            marker = " ...[cut; full value in config/resolved.yaml]"
            text = text[: MAX_PARAM_CHARS - len(marker)] + marker
            cut.append(key)
        items.append(Param(key, text))
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])
    if cut:
        c.set_tag(run_id, "posttrain.params_cut", ",".join(cut))


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0,
                synchronous: bool = True):
    """Log metrics at `step`. With synchronous=False, MLflow's background queue logs them and this returns
    a handle whose .wait() blocks until they are stored (raising if they could not be)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(sanitize_metric_name(k), float(v), now, step) for k, v in metrics.items()]
    c = client(tracking_uri)
    if not synchronous:
        return c.log_batch(run_id, metrics=batch[:1000], synchronous=False)
    for start in range(0, len(batch), 500):
        c.log_batch(run_id, metrics=batch[start : start + 500])


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_dict(tracking_uri: str, run_id: str, data: dict, artifact_file: str) -> None:
    client(tracking_uri).log_dict(run_id, data, artifact_file)


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(tracking_uri).log_text(run_id, text, artifact_file)


def log_table(tracking_uri: str, run_id: str, rows: list[dict], artifact_file: str) -> None:
    import pandas as pd

    client(tracking_uri).log_table(run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)


def log_artifacts(tracking_uri: str, run_id: str, local_dir: Path, artifact_path: str) -> None:
    client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_model_folder(env, run_id: str, folder: Path, artifact_path: str) -> None:
    """Upload a save_pretrained folder as run artifacts when it is small, else record it by reference.

    Uploaded, it loads back with `mlflow.artifacts.download_artifacts("runs:/<run_id>/<artifact_path>")`
    and `from_pretrained`; by reference, the run's tags posttrain.output_uri/_digest name it."""
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    if size_mb <= env.log_model_max_mb:
        log_artifacts(env.tracking_uri, run_id, folder, artifact_path)
        set_tags(env.tracking_uri, run_id, {f"posttrain.model.{artifact_path}": f"runs:/{run_id}/{artifact_path}"})
    else:
        set_tags(env.tracking_uri, run_id, {f"posttrain.model.{artifact_path}": "by-reference (see output_uri)"})


def log_artifact(tracking_uri: str, run_id: str, path: Path, artifact_path: str) -> None:
    client(tracking_uri).log_artifact(run_id, str(path), artifact_path)


def log_dataset(tracking_uri: str, run_id: str, files: list[Path], name: str, rows: int, context: str) -> None:
    """Record a prepared split (Parquet shards) as an MLflow dataset input: source, digest, schema and row
    count, read from the shards' metadata and a sample; the rows themselves are never loaded."""
    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.types.utils import _infer_schema

    from tasks.machinery.fingerprints import file_digest
    from tasks.machinery.store import digest_json

    sample = pq.ParquetFile(files[0]).read_row_group(0).slice(0, 100).to_pandas()
    for column in sample.columns:  # nested chat messages become JSON text for the schema
        if sample[column].map(lambda v: hasattr(v, "__len__") and not isinstance(v, str)).any():
            sample[column] = sample[column].map(lambda v: json.dumps(_plain(v)))
    digest = digest_json([file_digest(Path(f)) for f in files])
    with warnings.catch_warnings():  # MLflow's hints about source types and integer columns: nothing to act on
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(files[0]).parent))
        dataset = MetaDataset(source=source, name=name, digest=digest[:36], schema=_infer_schema(sample))
    inputs = [_dataset_input(dataset, [InputTag(key="mlflow.data.context", value=context),
                                       InputTag(key="posttrain.rows", value=str(rows))])]
    for attempt in range(3):
        try:
            return client(tracking_uri).log_inputs(run_id, datasets=inputs)
        except MlflowException as e:
            # Two runs logging the same data set at once: MLflow inserts the shared dataset row without a lock,
            # and the loser of the race sees a unique-constraint error; the row exists now, so log again.
            if "UNIQUE constraint" not in str(e) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def copy_dataset_inputs(tracking_uri: str, from_runs: list[str], run_id: str) -> None:
    """Record on `run_id` the dataset inputs the `from_runs` recorded (each data set once)."""
    from mlflow.entities import DatasetInput

    c = client(tracking_uri)
    seen, datasets = set(), []
    for source in from_runs:
        for item in c.get_run(source).inputs.dataset_inputs:
            if (item.dataset.name, item.dataset.digest) not in seen:
                seen.add((item.dataset.name, item.dataset.digest))
                datasets.append(DatasetInput(dataset=item.dataset, tags=item.tags))
    if datasets:
        c.log_inputs(run_id, datasets=datasets)


def _plain(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _dataset_input(dataset, tags):
    from mlflow.entities import DatasetInput

    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)


def end_run(tracking_uri: str, run_id: str, failed: bool = False, error: str | None = None) -> None:
    c = client(tracking_uri)
    if error:
        c.set_tag(run_id, "posttrain.error", error[:5000])
    c.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


SYSTEM_METRICS_ENV = "POSTTRAIN_SYSTEM_METRICS_SECONDS"


class SystemMetrics:
    """MLflow's system metrics (CPU and memory, disk, network, and GPU utilisation and memory where pynvml finds a
    GPU) sampled every `POSTTRAIN_SYSTEM_METRICS_SECONDS` (default 10; 0 = off) into a run as `system/*`.
    MLflow's monitor drops the samples of its last, unfinished interval; `stop()` logs them, so a stage shorter
    than one interval still records one point."""

    def __init__(self, tracking_uri: str, run_id: str):
        import os

        self.monitor = None
        seconds = float(os.environ.get(SYSTEM_METRICS_ENV, "10") or 0)
        if seconds <= 0:
            return
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not a line per start and stop
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=seconds, tracking_uri=tracking_uri)
        self.monitor.start()

    def stop(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        monitor._shutdown_event.set()
        if monitor._process is not None:
            monitor._process.join()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as e:  # noqa: BLE001 - system metrics are never worth failing a stage for
            warnings.warn(f"system metrics not logged: {e}", stacklevel=2)


def registered_name(recipe: str, instance: str) -> str:
    """The registered model of a recipe's instance (its rounds are versions of it): <recipe>-<instance>."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{recipe}-{instance.split('.round')[0]}")


def register_model_version(tracking_uri: str, name: str, source: str, run_id: str | None, tags: dict[str, str],
                           description: str = "") -> str:
    """A version of registered model `name` for `source` (a model folder URI), reusing the version that already
    names the same output (posttrain.output_digest): a cached stage rerun registers nothing new."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(name, description=description or None)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    digest = tags.get("posttrain.output_digest")
    if digest:
        for version in c.search_model_versions(f"name = '{name}'"):
            if version.tags.get("posttrain.output_digest") == digest:
                return str(version.version)
    return str(c.create_model_version(name, source=source, run_id=run_id, tags=tags).version)
