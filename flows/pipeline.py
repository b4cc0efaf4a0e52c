"""The post-training flow: data -> (pretrain) -> SFT -> reward model -> alignment -> evaluation.

Orchestration only. Each stage is a cached Prefect task from tasks/; stages hand each other
references (URI + digest). A stage that comes from cache still gets its MLflow child run.
"""

from __future__ import annotations

import time
from typing import Callable

from prefect import flow, get_run_logger

from flows.config import PipelineConfig, load_config
from flows.lineage import close_pipeline_run, open_pipeline_run
from tasks.align import align_task
from tasks.data import prepare_data_task, source_refs
from tasks.evaluate import evaluate_task
from tasks.modeling import resolve_base_model
from tasks.pretrain import pretrain_task
from tasks.reward import reward_task
from tasks.sft import sft_task
from tasks.stage import cache_key_for, record_cached_stage
from tasks.store import ArtifactStore, Ref


class PipelineFailed(RuntimeError):
    """A stage failed; `summary` holds what ran up to and including the failure."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class _Runner:
    """Runs stage tasks in order, keeping the per-stage outcomes for the summary."""

    def __init__(self, cfg: PipelineConfig, env: dict):
        self.cfg, self.env = cfg, env
        self.store = ArtifactStore(cfg.storage.root)
        self.outcomes: list[dict] = []
        self.result_storage = _result_storage(cfg.storage.root)

    def __call__(self, task, config, inputs: dict[str, dict] | Callable[[], dict[str, dict]]) -> dict:
        if callable(inputs):  # resolving inputs reads them (data fingerprints): a failure is the stage's
            try:
                inputs = inputs()
            except Exception as exc:
                self._failed(task.name, 0.0, f"{type(exc).__name__}: {exc}")
        params = dict(config=config.model_dump(mode="json"), inputs=inputs, seed=self.cfg.seed, env=self.env)
        started = time.monotonic()
        pool = self.cfg.orchestration.stage_pools.get(task.name)
        if pool:
            result, cached = self._run_on_pool(task.name, pool, params, started)
        else:
            result, cached = self._run_here(task, params, started)
        seconds = time.monotonic() - started
        run_id = record_cached_stage(result, self.env) if cached else result["mlflow_run_id"]
        self.outcomes.append({
            "name": task.name,
            "status": "cached" if cached or result.get("reused") else "completed",
            "cache_key": result["cache_key"],
            "output_uri": result["output"]["uri"],
            "output_digest": result["output"]["digest"],
            "mlflow_run_id": run_id,
            "seconds": round(seconds, 3),
            "metrics": result["metrics"],
        })
        return result["output"]


    def _run_here(self, task, params: dict, started: float) -> tuple[dict, bool]:
        o = self.cfg.orchestration
        task = task.with_options(result_storage=self.result_storage, retries=o.retries,
                                 retry_delay_seconds=o.retry_delay_seconds or 0)
        state = task(**params, return_state=True)
        cached = state.name == "Cached"
        if cached and self._unusable(task.name, Ref.from_dict(state.result()["output"])):
            state = task.with_options(refresh_cache=True)(**params, return_state=True)
            cached = False
        if state.is_failed():
            self._failed(task.name, time.monotonic() - started, _error_text(state))
        return state.result(), cached

    def _unusable(self, stage: str, ref: Ref) -> bool:
        """A cache hit whose output is gone or corrupted in the store: quarantine what is bad, recompute."""
        problem = self.store.problem(ref)
        if problem is None:
            return False
        if self.store.exists(ref):  # committed, but a file no longer matches its digest
            aside = self.store.quarantine(ref.uri, problem)
            get_run_logger().warning("%s: %s; moved its manifest to %s and recomputing", stage, problem, aside)
        else:
            get_run_logger().warning("%s: cached output unusable (%s); recomputing", stage, problem)
        return True

    def _run_on_pool(self, stage: str, pool: str, params: dict, started: float) -> tuple[dict, bool]:
        """Run the stage as a flow run of posttrain-stage/<pool> and read its output from the shared store."""
        from prefect.deployments import run_deployment

        from tasks.tracking import strip_credentials

        # Parameters are stored by Prefect and shown in its UI: no credentials in them. The stage's worker
        # takes its own (run_stage_flow).
        env = {**params["env"], "tracking_uri": strip_credentials(params["env"]["tracking_uri"]),
               "storage_root": strip_credentials(params["env"]["storage_root"])}
        flow_run = run_deployment(f"posttrain-stage/{pool}", parameters={"stage": stage, **params, "env": env},
                                  timeout=None)
        if not flow_run.state.is_completed():
            self._failed(stage, time.monotonic() - started, f"stage flow run {flow_run.id} on work pool {pool!r} "
                         f"ended {flow_run.state.name}: {flow_run.state.message}")
        key = cache_key_for(stage, params)
        output = self.store.lookup(stage, key)
        if output is None:
            self._failed(stage, time.monotonic() - started, f"stage flow run {flow_run.id} left no output for {key}")
        metadata = self.store.read_manifest(output.uri)["metadata"]
        result = {"name": stage, "cache_key": key, "output": output.to_dict(), "metrics": metadata.get("metrics", {}),
                  "mlflow_run_id": metadata.get("mlflow_run_id"), "reused": False}
        return result, _task_was_cached(flow_run.id)

    def _failed(self, name: str, seconds: float, error: str):
        self.outcomes.append({"name": name, "status": "failed", "cache_key": None, "output_uri": None,
                              "mlflow_run_id": None, "seconds": round(seconds, 3), "metrics": {}, "error": error})
        raise PipelineFailed(f"stage {name} failed: {error}", {"stages": self.outcomes})


def _task_was_cached(flow_run_id) -> bool:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return bool(runs) and all(r.state and r.state.name == "Cached" for r in runs)


def _error_text(state) -> str:
    """The failed task's exception as 'Type: message'."""
    try:
        state.result()
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"
    return str(state.message)


def _result_storage(storage_root: str):
    """Prefect results (the small stage records that make caching work) live beside the artifacts.

    A remote root needs a saved storage block; it holds only the base path, never credentials (s3fs
    reads those from the standard AWS environment)."""
    import hashlib
    from pathlib import Path

    from prefect.filesystems import RemoteFileSystem

    path = f"{storage_root.rstrip('/')}/prefect-results"
    if "://" not in storage_root:
        return Path(path)
    block = RemoteFileSystem(basepath=path)
    block.save(f"posttrain-results-{hashlib.sha256(path.encode()).hexdigest()[:12]}", overwrite=True)
    return block


STAGE_TASKS = {
    "prepare_data": prepare_data_task, "pretrain": pretrain_task, "sft": sft_task,
    "reward": reward_task, "align": align_task, "evaluate": evaluate_task,
}


@flow(name="posttrain-stage")
def run_stage_flow(stage: str, config: dict, inputs: dict, seed: int, env: dict) -> None:
    """One stage on another work pool (orchestration.stage_pools): the same cached task, the same store.
    Credentials come from this worker's environment, not from the parameters."""
    from tasks.tracking import with_local_credentials

    env = {**env, "tracking_uri": with_local_credentials(env["tracking_uri"])}
    task = STAGE_TASKS[stage].with_options(result_storage=_result_storage(env["storage_root"]))
    task(config=config, inputs=inputs, seed=seed, env=env)


@flow(name="posttrain")
def post_training_pipeline(config: PipelineConfig | None = None, run_tags: dict[str, str] | None = None) -> dict:
    """Run every post-training stage of one recipe (default: configs/demo.yaml); returns the run summary.
    `run_tags` are added to the MLflow parent run (e.g. what run this reproduces)."""
    cfg = (config or load_config()).resolved()
    env = open_pipeline_run(cfg, run_tags)
    run = _Runner(cfg, env)
    error: BaseException | None = None
    try:
        data = run(prepare_data_task, cfg.data, lambda: source_refs(cfg.data))
        if cfg.pretrain.enabled:
            base = run(pretrain_task, cfg.pretrain, {})
        else:
            base = resolve_base_model(cfg.model.base)
        sft = run(sft_task, cfg.sft, {"data": data, "base": base})
        reward = run(reward_task, cfg.reward, {"data": data, "init": sft})
        align_inputs = {"data": data, "sft": sft, **({"reward": reward} if cfg.align.method == "rlhf" else {})}
        policy = run(align_task, cfg.align, align_inputs)
        run(evaluate_task, cfg.evaluate, {"data": data, "base": base, "sft": sft, "policy": policy, "reward": reward})
    except BaseException as exc:
        error = exc
    summary = close_pipeline_run(cfg, env, run.outcomes, error)
    if error is not None:
        raise PipelineFailed(str(error), summary) from error
    return summary
