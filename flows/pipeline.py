"""The post-training flow: the recipe's stage graph, each stage instance a run of the one stage task.

Orchestration only. Stages hand each other references (URI + digest); a stage that comes from cache
still gets its MLflow child run. Instances sent to work pools run concurrently when independent;
instances in this process run one at a time, so results are the same either way.
"""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from prefect import flow, get_run_logger

from flows.config import PipelineConfig, load_config, validate_recipe
from flows.graph import Node, build_nodes, downstream_of, node_names, with_upstream
from flows.lineage import close_pipeline_run, open_pipeline_run, recipe_tags
from tasks.machinery.stagekind import MODEL_OUTPUTS
from tasks.machinery.context import store_area
from tasks.stage import cache_key_for, record_cached_stage, stage_task
from tasks.machinery.store import ArtifactStore, Ref


class PipelineFailed(RuntimeError):
    """A stage failed; `summary` holds what ran up to and including the failure."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def node_inputs(cfg: PipelineConfig, node: Node, outputs: dict[str, dict], models: dict[str, dict]) -> dict[str, dict]:
    """The stage's inputs as references: upstream outputs, external models (each resolved, and a folder
    hashed, once per run: `models` keeps them), the sources it reads."""
    from tasks.machinery.modeling import resolve_model

    inputs = {slot: outputs[up] for slot, up in node.stage_inputs.items()}
    for slot, ref in node.model_inputs.items():
        if ref not in models:
            models[ref] = resolve_model(ref, cfg.tracking.uri)
        inputs[slot] = models[ref]
    if node.kind.source_inputs:
        inputs |= node.kind.source_inputs(cfg.stages[node.instance], cfg.tracking.uri)
    return inputs


def stage_parameters(cfg: PipelineConfig, node: Node, inputs: dict, env: dict, refresh: bool = False) -> dict:
    ray = cfg.orchestration.ray_settings(node.instance)
    return dict(kind=node.kind.name, instance=node.name, config=node.settings, inputs=inputs, seed=cfg.seed,
                env={**env, "ray": ray} if ray else env, round=node.round, refresh=refresh)


def selection(nodes: list[Node], only: list[str] = (), start_from: list[str] = ()) -> set[str]:
    """Node names to run: all; or --only instances; or --from instances and everything downstream of them."""
    if not only and not start_from:
        return {n.name for n in nodes}
    chosen: set[str] = set()
    for name in only:
        chosen |= node_names(nodes, name)
    for name in start_from:
        chosen |= downstream_of(nodes, node_names(nodes, name))
    return chosen


def run_graph(nodes: list[Node], run_node: Callable[[Node, dict[str, dict]], dict],
              concurrent: Callable[[Node], bool] = lambda node: False) -> dict[str, dict]:
    """Run every node once its inputs are done; returns {node name: output}. Nodes for which `concurrent`
    is true (work-pool stages) overlap with each other and with one local node; local nodes run one at a
    time. On a failure no further node starts; the first error is raised once running nodes finish."""
    outputs: dict[str, dict] = {}
    if not any(concurrent(n) for n in nodes):
        for node in nodes:
            outputs[node.name] = run_node(node, outputs)
        return outputs
    local = threading.Lock()
    failed = threading.Event()
    errors: list[BaseException] = []
    done = {n.name: threading.Event() for n in nodes}

    def run(node: Node) -> None:
        try:
            for up in node.upstream:
                done[up].wait()
            if failed.is_set():
                return
            if concurrent(node):
                outputs[node.name] = run_node(node, outputs)
            else:
                with local:
                    outputs[node.name] = run_node(node, outputs)
        except BaseException as exc:
            errors.append(exc)
            failed.set()
        finally:
            done[node.name].set()

    with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="posttrain-stage") as pool:
        for node in nodes:  # each thread sees the flow run's context, so its task runs belong to this flow run
            pool.submit(contextvars.copy_context().run, run, node)
    if errors:
        raise errors[0]
    return outputs


class _Runner:
    """Runs stage instances, keeping the per-stage outcomes for the summary."""

    def __init__(self, cfg: PipelineConfig, env: dict, selected: set[str], refresh: set[str]):
        self.cfg, self.env, self.selected, self.refresh = cfg, env, selected, refresh
        self.store = ArtifactStore(cfg.storage.root)
        self.outcomes: list[dict] = []
        self.models: dict[str, dict] = {}  # external models by reference, resolved once per run
        self.result_storage = _result_storage(cfg.storage.root)

    def __call__(self, node: Node, outputs: dict[str, dict]) -> dict:
        started = time.monotonic()
        try:  # resolving inputs reads them (data fingerprints, model folders): a failure is the stage's
            inputs = node_inputs(self.cfg, node, outputs, self.models)
        except Exception as exc:
            self._failed(node, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
        params = stage_parameters(self.cfg, node, inputs, self.env, refresh=node.name in self.refresh)
        if node.name not in self.selected:
            result, cached = self._from_store(node, params, started), True
        elif pool := self.cfg.orchestration.stage_pools.get(node.instance):
            result, cached = self._run_on_pool(node, pool, params, started)
        else:
            result, cached = self._run_here(node, params, started)
        seconds = time.monotonic() - started
        run_id = (record_cached_stage(result, node.name, self.env, params["inputs"]) if cached
                  else result["mlflow_run_id"])
        self.outcomes.append({
            "name": node.name,
            "kind": node.kind.name,
            "instance": node.instance,
            "round": node.round,
            "status": "cached" if cached or result.get("reused") else "completed",
            "cache_key": result["cache_key"],
            "output_uri": result["output"]["uri"],
            "output_digest": result["output"]["digest"],
            "mlflow_run_id": run_id,
            "seconds": round(seconds, 3),
            "timings": result.get("timings", {}),
            "metrics": result["metrics"],
        })
        if node.kind.output in MODEL_OUTPUTS and not self.env.get("reproduction_of"):  # a reproduction registers nothing
            self.outcomes[-1]["registered_model"] = self._register(node, result, run_id, params["inputs"])
        return result["output"]

    def _register(self, node: Node, result: dict, run_id: str, inputs: dict) -> str | None:
        """Every model the run trains is a version of the registered model <recipe>-<instance> (rounds are
        versions), by reference to its files in the artifact store, linked to the stage run that made it."""
        import logging

        from tasks.machinery import tracking

        ref = Ref.from_dict(result["output"])
        name = tracking.registered_name(self.cfg.name, node.name)
        tags = {"posttrain.pipeline_run_id": self.env["parent_run_id"], "posttrain.stage_run_id": run_id,
                "posttrain.stage": node.name, "posttrain.kind": node.kind.name, "posttrain.role": node.kind.output,
                "posttrain.cache_key": result["cache_key"], "posttrain.output_digest": ref.digest,
                "posttrain.data_digest": inputs.get("data", {}).get("digest", ""), "posttrain.round": str(node.round)}
        try:
            version = tracking.register_model_version(
                self.cfg.tracking.uri, name, self.store.files_uri(ref), run_id, tags,
                description=f"{node.kind.name} outputs of recipe {self.cfg.name} (one version per trained model)")
        except Exception as e:  # noqa: BLE001 - the output is committed; a registry hiccup must not lose the run
            logging.getLogger("posttrain").warning("[%s] not registered in the MLflow model registry: %s", node.name, e)
            return None
        uri = f"models:/{name}/{version}"
        tracking.set_tags(self.cfg.tracking.uri, run_id, {"posttrain.registered_model": uri})
        return uri

    def _run_here(self, node: Node, params: dict, started: float) -> tuple[dict, bool]:
        o = self.cfg.orchestration
        task = stage_task().with_options(
            name=node.kind.name, task_run_name=node.name, result_storage=self.result_storage, retries=o.retries,
            retry_delay_seconds=o.retry_delay_seconds or 0, refresh_cache=params["refresh"] or None)
        state = task(**params, return_state=True)
        cached = state.name == "Cached"
        if cached and self._unusable(node.name, Ref.from_dict(state.result()["output"])):
            state = task.with_options(refresh_cache=True)(**params, return_state=True)
            cached = False
        if state.is_failed():
            self._failed(node, time.monotonic() - started, _error_text(state))
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

    def _stored_result(self, node: Node, params: dict) -> dict | None:
        key = cache_key_for(node.kind.name, params)
        output = self.store.lookup(store_area(key), key)
        if output is None:
            return None
        metadata = self.store.read_manifest(output.uri)["metadata"]
        return {"name": node.name, "kind": node.kind.name, "cache_key": key, "output": output.to_dict(),
                "metrics": metadata.get("metrics", {}), "mlflow_run_id": metadata.get("mlflow_run_id"),
                "reused": False}

    def _from_store(self, node: Node, params: dict, started: float) -> dict:
        """A stage outside --only/--from whose output a selected stage reads: it must be in the store."""
        result = self._stored_result(node, params)
        if result is None:
            self._failed(node, time.monotonic() - started,
                         f"not selected, and the store holds no output for its current settings and inputs; "
                         f"run it first (posttrain run --only {node.instance}) or select it (--from {node.instance})")
        return result

    def _run_on_pool(self, node: Node, pool: str, params: dict, started: float) -> tuple[dict, bool]:
        """Run the stage as a flow run of posttrain-stage/<pool> and read its output from the shared store."""
        from prefect.deployments import run_deployment

        from tasks.machinery.tracking import strip_credentials

        # Parameters are stored by Prefect and shown in its UI: no credentials in them. The stage's worker
        # takes its own (run_stage_flow).
        env = {**params["env"], "tracking_uri": strip_credentials(params["env"]["tracking_uri"]),
               "storage_root": strip_credentials(params["env"]["storage_root"])}
        flow_run = run_deployment(f"posttrain-stage/{pool}", parameters={**params, "env": env}, timeout=None)
        if not flow_run.state.is_completed():
            self._failed(node, time.monotonic() - started, f"stage flow run {flow_run.id} on work pool {pool!r} "
                         f"ended {flow_run.state.name}: {flow_run.state.message}")
        result = self._stored_result(node, params)
        if result is None:
            self._failed(node, time.monotonic() - started, f"stage flow run {flow_run.id} left no output for "
                         f"{cache_key_for(node.kind.name, params)}")
        return result, _task_was_cached(flow_run.id)

    def _failed(self, node: Node, seconds: float, error: str):
        self.outcomes.append({"name": node.name, "kind": node.kind.name, "instance": node.instance,
                              "round": node.round, "status": "failed", "cache_key": None, "output_uri": None,
                              "mlflow_run_id": None, "seconds": round(seconds, 3), "metrics": {},
                              "error": error})
        raise PipelineFailed(f"stage {node.name} failed: {error}", {"stages": self.outcomes})


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


@flow(name="posttrain-stage", flow_run_name="{instance}")
def run_stage_flow(kind: str, instance: str, config: dict, inputs: dict, seed: int, env: dict, round: int = 1,
                   refresh: bool = False) -> None:
    """One stage instance on another work pool (orchestration.stage_pools): the same cached task, the same
    store. Credentials come from this worker's environment, not from the parameters."""
    from tasks.machinery.tracking import with_local_credentials

    env = {**env, "tracking_uri": with_local_credentials(env["tracking_uri"])}
    task = stage_task().with_options(name=kind, task_run_name=instance,
                                     result_storage=_result_storage(env["storage_root"]),
                                     refresh_cache=refresh or None)
    task(kind=kind, instance=instance, config=config, inputs=inputs, seed=seed, env=env, round=round, refresh=refresh)


def recipe_config(recipe: str | None, overrides: list[str], config: PipelineConfig | None) -> PipelineConfig:
    """The recipe a flow run runs: `config` when given (a full typed recipe), else the recipe file; then the
    dotted overrides."""
    if config is not None:
        return validate_recipe(config.model_dump(mode="json"), overrides, "config") if overrides else config
    return load_config(recipe, overrides)


@flow(name="posttrain")
def post_training_pipeline(
    recipe: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    config: PipelineConfig | None = None,
    only: list[str] | None = None,
    start_from: list[str] | None = None,
    refresh: list[str] | None = None,
    run_tags: dict[str, str] | None = None,
) -> dict:
    """Run a post-training recipe's stage graph; returns the run summary.

    recipe: the recipe file (relative to the project, e.g. configs/demo.yaml).
    overrides: dotted overrides, e.g. ["align.beta=0.2", "seed=1"].
    config: a full typed recipe instead of the file (overrides still apply).
    only / start_from: run just these stage instances / these and everything downstream of them; the
    stages they read must already be in the store. refresh: recompute these even if cached.
    run_tags: added to the MLflow parent run (e.g. what run this reproduces)."""
    cfg = recipe_config(recipe, overrides or [], config).resolved()
    nodes = build_nodes(cfg)
    chosen = selection(nodes, only or [], start_from or [])
    needed = with_upstream(nodes, chosen)
    nodes = [n for n in nodes if n.name in needed]
    refreshed = set().union(*(node_names(nodes, name) for name in refresh or []))
    said = recipe_tags(recipe, overrides) if config is None else {}
    env = open_pipeline_run(cfg, {**said, **(run_tags or {})})
    runner = _Runner(cfg, env, chosen, refreshed)
    pools = cfg.orchestration.stage_pools
    error: BaseException | None = None
    try:
        run_graph(nodes, runner, concurrent=lambda node: node.instance in pools and node.name in chosen)
    except BaseException as exc:
        error = exc
    order = {n.name: i for i, n in enumerate(nodes)}
    runner.outcomes.sort(key=lambda o: order.get(o["name"], len(order)))
    summary = close_pipeline_run(cfg, env, runner.outcomes, error)
    if error is not None:
        raise PipelineFailed(str(error), summary) from error
    return summary

