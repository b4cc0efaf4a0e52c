"""Stages on a Ray cluster (orchestration.engine: ray): data-parallel training with Ray Train's TorchTrainer,
and generation and scoring batches fanned out as Ray tasks. Ray schedules; nothing here does.

The stage itself (cache key, MLflow child run, store commit, retry classification) stays in the pipeline's
process; only its heavy work goes to the cluster:

* Training: `train` runs the stage's training function on `workers` Ray Train workers (torch.distributed over
  gloo on CPU, NCCL on GPUs). The recipe fixes the global batch (training.batch_size x training.processes);
  the engine only chooses how many workers share it, so a stage learns the same on 1 process or N workers
  (to float summation order) and its cache key does not depend on where it ran. Each worker reads the inputs
  from the artifact store (which must be shared: S3, or a filesystem every node mounts); rank 0 writes the
  output, which comes back as a Ray Train checkpoint in `storage` and is committed by the stage as usual.
  Store checkpoints (training.checkpoint_steps) work as with torchrun: when a worker dies, Ray Train restarts
  the group (up to max_failures times) and every rank resumes from the newest stored checkpoint; past that
  budget, or when a node goes away, the stage fails with a transient error and Prefect retries it.
* Generation: `map_batches` sends contiguous runs of batches, with the model in Ray's object store, to Ray
  tasks; each batch is seeded by its own index, so the replies do not depend on how batches were spread.

Credentials never travel as parameters: workers read S3 and MLflow credentials from their own environment.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from tasks.machinery.training import Section

logger = logging.getLogger("posttrain")

# fault points travel to the workers (tests kill and hold ranks with them); nothing else is forwarded
_FORWARDED_ENV = ("POSTTRAIN_KILL_AT", "POSTTRAIN_KILL_ONCE", "POSTTRAIN_HOLD_AT")


class RayResources(Section):
    workers: int = Field(2, ge=1, description="Ray workers a stage's training (Ray Train) and generation use.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker reserves (training: NCCL when > 0).")
    memory_gb_per_worker: float | None = Field(None, gt=0, description="Memory each worker reserves, in GB "
                                               "(Ray places workers only where it fits); none: not reserved.")
    max_failures: int = Field(1, ge=0, description="Worker failures Ray Train recovers from inside one attempt "
                              "(it restarts the workers, which resume from the newest stored checkpoint); "
                              "beyond that the stage fails as transient and Prefect retries it.")


class RaySettings(RayResources):
    address: str | None = Field(None, description="Ray cluster to join: 'auto' (this node's cluster), host:6379, "
                                "or ray://host:10001 (Ray Client); none starts a local Ray runtime.")
    storage: str | None = Field(None, description="Where Ray Train hands the output from rank 0 to the stage: "
                                "a path or URI every node can reach; default <storage.root>/ray-train.")
    scratch: str | None = Field(None, description="Folder the ranks share for a checkpoint's per-rank RNG state "
                                "(the same path on every node); default: the temp folder, shared only by "
                                "workers on one machine. Set it to a shared mount on a multi-machine cluster "
                                "when training.checkpoint_steps is used.")
    stages: dict[str, RayResources] = Field(default_factory=dict, description="Resources (and failure budget) per "
                                            "stage instance, e.g. {sft: {workers: 4, gpus_per_worker: 1}}; what a "
                                            "stage does not set comes from the settings above.")

    def for_stage(self, instance: str) -> dict:
        """The settings one stage instance runs with (what its entry sets, the rest from the cluster's)."""
        base = self.model_dump(mode="json", exclude={"stages"})
        if instance in self.stages:
            base |= self.stages[instance].model_dump(mode="json", exclude_unset=True)
        return base


class RayStageFailed(RuntimeError):
    """A Ray worker failed with an error that fails the same way again (bad data, a bug)."""


class TransientRayFailure(RayStageFailed, ConnectionError):
    """A worker or node went away, or a worker failed with a transient error: Prefect retries the stage."""


_connected = threading.Lock()
_dashboard: list[str] = []  # the dashboard of the cluster this process joined, when it runs one
_active: ContextVar[dict | None] = ContextVar("posttrain_ray", default=None)


def connect(settings: dict) -> None:
    """Join the configured cluster (or start a local runtime) once per process."""
    import ray

    with _connected:
        if ray.is_initialized():
            return
        info = ray.init(address=settings.get("address"), logging_level=logging.WARNING, log_to_driver=True)
        _dashboard[:] = [info.dashboard_url] if getattr(info, "dashboard_url", None) else []
        context = ray.get_runtime_context()
        logger.info("Ray cluster %s (job %s, %d nodes)", context.gcs_address, context.get_job_id(),
                    sum(1 for n in ray.nodes() if n["Alive"]))


def cluster_tags() -> dict[str, str]:
    """MLflow tags that lead from a stage run to the Ray job it used (and the dashboard, where one runs)."""
    import ray

    context = ray.get_runtime_context()
    tags = {"posttrain.ray.job_id": context.get_job_id(), "posttrain.ray.gcs_address": context.gcs_address}
    if _dashboard:
        url = _dashboard[0] if "://" in _dashboard[0] else f"http://{_dashboard[0]}"
        tags["posttrain.ray.dashboard"] = url
        tags["posttrain.ray.job_url"] = f"{url}/#/jobs/{context.get_job_id()}"
    return tags


@contextmanager
def active(settings: dict | None):
    """Inside this block, generation and scoring fan out over the Ray cluster (None: they run here)."""
    token = _active.set(settings)
    try:
        yield
    finally:
        _active.reset(token)


def current() -> dict | None:
    return _active.get()


# ---- training ------------------------------------------------------------------------------------------


def _resources(s: dict) -> dict:
    resources = {"CPU": s["cpus_per_worker"]}
    if s["gpus_per_worker"]:
        resources["GPU"] = s["gpus_per_worker"]
    if s.get("memory_gb_per_worker"):
        resources["memory"] = s["memory_gb_per_worker"] * 1024 ** 3
    return resources


def _warn_unless_it_fits(s: dict, workers: int, stage: str | None) -> None:
    """Ray waits for resources it does not have (an autoscaling cluster adds nodes); say so, once, instead of
    leaving a silent wait on a cluster that will never grow."""
    import ray

    available = ray.cluster_resources()
    need = {k: v * workers for k, v in _resources(s).items()}
    short = {k: f"{v:g} wanted, {available.get(k, 0):g} in the cluster" for k, v in need.items()
             if available.get(k, 0) < v}
    if short:
        logger.warning("[%s] %d Ray workers need more than the cluster has now (%s): waiting for Ray to find them. "
                       "An autoscaling cluster adds nodes; on a fixed one lower orchestration.ray workers or the "
                       "per-worker resources", stage or "stage", workers, "; ".join(f"{k}: {v}" for k, v in short.items()))


def per_worker_training(t, workers: int):
    """The training settings each of `workers` ranks runs with: the same global batch, split among them."""
    global_batch = t.batch_size * t.processes
    if global_batch % workers:
        raise ValueError(f"training.batch_size x training.processes = {global_batch} (the global batch) does not "
                         f"split evenly over orchestration.ray workers = {workers}; choose workers that divide it")
    return t.model_copy(update={"batch_size": global_batch // workers, "processes": workers})


def _storage(storage_root: str, storage: str | None) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: a local path as it is; a URI through the store's fsspec
    filesystem (the same credentials and endpoint the store uses)."""
    target = storage or f"{storage_root.rstrip('/')}/ray-train"
    if "://" not in target or target.startswith("file://"):
        path = Path(target.removeprefix("file://")).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(target)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def train(rank_fn: Callable, spec: dict, settings: dict, storage_root: str, name: str, out: Path,
          classify: Callable[[BaseException], bool], stage: str | None = None) -> dict:
    """Run `rank_fn(spec)` on `settings["workers"]` Ray Train workers (torch.distributed set up); it returns
    (metrics, output folder) on rank 0. The output folder comes back into `out`; returns rank 0's metrics plus
    ray/workers and ray/nodes. A failure is raised as TransientRayFailure when a worker or node went away or
    `classify` calls the worker's error transient, else as RayStageFailed."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    connect(settings)
    storage_path, storage_fs = _storage(storage_root, settings.get("storage"))
    _warn_unless_it_fits(settings, settings["workers"], stage)
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"rank_fn": rank_fn, "spec": spec},
        scaling_config=ScalingConfig(num_workers=settings["workers"], use_gpu=bool(settings["gpus_per_worker"]),
                                     resources_per_worker=_resources(settings)),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=settings["max_failures"]),
                             worker_runtime_env={"env_vars": _worker_env()}),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise _failure(exc, classify) from exc
    result.checkpoint.to_directory(str(out))
    try:
        result.checkpoint.filesystem.delete_dir(f"{storage_path.rstrip('/')}/{name}")
    except Exception as e:  # noqa: BLE001 - leftover hand-over files are harmless
        logger.info("[%s] Ray Train's run folder %s/%s not removed: %s", stage, storage_path, name, e)
    return result.metrics["metrics"]


def scratch_folder(settings: dict, name: str) -> Path:
    """The folder the ranks of one training run share (see RaySettings.scratch)."""
    return Path(settings.get("scratch") or tempfile.gettempdir()) / "posttrain-ray" / name


def _worker_env() -> dict[str, str]:
    # Ray Train's print patch would turn output that libraries capture (datasets' fingerprinting disassembles
    # functions into a captured stdout) into console lines
    return {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **{k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}}


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: the rank's work, then the nodes the ranks ran on, and (rank 0) the output."""
    import torch.distributed as dist

    import ray
    import ray.train
    from ray.train import Checkpoint

    metrics, out = config["rank_fn"](config["spec"])
    nodes = [ray.get_runtime_context().get_node_id()]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, nodes[0])
        nodes = gathered
    if ray.train.get_context().get_world_rank() == 0:
        metrics = {**metrics, "ray/workers": float(len(nodes)), "ray/nodes": float(len(set(nodes)))}
        ray.train.report({"metrics": metrics}, checkpoint=Checkpoint.from_directory(str(out)))
    else:
        ray.train.report({})


def _failure(exc, is_transient: Callable[[BaseException], bool]) -> RayStageFailed:
    """The first worker's error, classified: worker or node death and transient errors are transient."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        cause = getattr(exc, "controller_failure", exc)
        return TransientRayFailure(f"Ray Train failed: {type(cause).__name__}: {cause}") if _is_death(cause) or \
            is_transient(cause) else RayStageFailed(f"Ray Train failed: {type(cause).__name__}: {cause}")
    rank, error = sorted(failures.items())[0]
    cause = getattr(error, "cause", None) or error
    others = f"; ranks {', '.join(str(r) for r in sorted(failures) if r != rank)} failed too" \
        if len(failures) > 1 else ""
    message = f"Ray worker of rank {rank} failed: {type(cause).__name__}: {_first_line(cause)}{others}"
    transient = any(_is_death(e) or is_transient(getattr(e, "cause", None) or e) for e in failures.values())
    return TransientRayFailure(message) if transient else RayStageFailed(message)


def _is_death(exc: BaseException) -> bool:
    """A worker process or its node went away (killed, out of memory, node lost)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _DEATHS:
            return True
        exc = (getattr(exc, "cause", None) or getattr(exc, "health_check_failure", None) or exc.__cause__
               or exc.__context__)
    return False


# Ray core's and Ray Train's names for a worker or node that went away, or a group that could not start in time
_DEATHS = {"ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError", "RaySystemError",
           "OwnerDiedError", "ObjectLostError", "LocalRayletDiedError", "WorkerHealthCheckFailedError",
           "WorkerHealthCheckTimeoutError", "WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else ""


# ---- generation and scoring ------------------------------------------------------------------------------


def map_batches(batch_fn: Callable, model, tokenizer, batches: list, settings: dict) -> list:
    """[batch_fn(model, tokenizer, batch) for batch in batches], computed by Ray tasks: each task takes a
    contiguous run of batches, so the results come back in order."""
    import ray

    connect(settings)
    workers = min(settings["workers"], len(batches))
    _warn_unless_it_fits(settings, workers, None)
    on_cpu = next(model.parameters()).device.type == "cpu"
    model_ref, tokenizer_ref = ray.put(model if on_cpu else copy.deepcopy(model).cpu()), ray.put(tokenizer)
    options = {"num_cpus": settings["cpus_per_worker"], "num_gpus": settings["gpus_per_worker"] or 0,
               "max_retries": 2, "retry_exceptions": False}
    if settings.get("memory_gb_per_worker"):
        options["memory"] = int(settings["memory_gb_per_worker"] * 1024 ** 3)
    run = ray.remote(_run_batches).options(**options)
    bounds = [round(i * len(batches) / workers) for i in range(workers + 1)]
    parts = ray.get([run.remote(batch_fn, model_ref, tokenizer_ref, batches[a:b])
                     for a, b in zip(bounds, bounds[1:]) if b > a])
    return [r for part in parts for r in part]


def _run_batches(batch_fn, model, tokenizer, batches):
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    return [batch_fn(model, tokenizer, b) for b in batches]
