"""Stages as a Python API for your own Prefect flows.

    from prefect import flow
    from flows.api import PipelineRun

    @flow
    def beta_sweep(betas: list[float] = [0.1, 0.5]):
        with PipelineRun("beta-sweep", seed=0) as run:
            data = run.stage("prepare_data", "data", preference={"source": "pairs.jsonl"})
            policies = {f"dpo_{b}": run.stage("dpo", f"dpo_{b}", inputs={"data": data, "policy": "org/model"},
                                              beta=b) for b in betas}
        return run.summary

Each `run.stage(kind, name, inputs=..., **settings)` validates the settings against the kind's typed
config and the inputs against its slots, then runs the same cached Prefect task, with the same store,
MLflow child run and retries, as a recipe's stage; it returns the stage's output, which later stages
take as an input. Inputs are outputs of earlier stages or model references (Hub id, folder, s3://,
models:/name@alias). The `with` block opens the MLflow parent run and closes it with the summary
(`run.summary`), also when a stage fails.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.config import ModelConfig, OrchestrationConfig, PipelineConfig, StorageConfig, TrackingConfig
from flows.graph import Node
from tasks.kinds import get


@dataclass(frozen=True)
class StageOutput:
    """A stage's output: where it is (uri + digest), what it is (the kind's output type) and its metrics."""

    name: str
    type: str
    ref: dict
    metrics: dict


class PipelineRun:
    def __init__(self, name: str = "posttrain", seed: int = 0, storage_root: str | None = None,
                 tracking_uri: str | None = None, experiment: str = "posttrain",
                 orchestration: OrchestrationConfig | None = None, trust_remote_code: bool = False):
        self.cfg = PipelineConfig.model_construct(
            name=name, seed=seed, storage=StorageConfig(root=storage_root),
            tracking=TrackingConfig(uri=tracking_uri, experiment=experiment),
            orchestration=orchestration or OrchestrationConfig(), stages={},
            model=ModelConfig(trust_remote_code=trust_remote_code),
        ).resolved()
        self.summary: dict | None = None
        self._outputs: dict[str, dict] = {}
        self._producers: dict = {}

    def __enter__(self) -> "PipelineRun":
        from flows.lineage import open_pipeline_run
        from flows.pipeline import _Runner

        self.env = open_pipeline_run(self.cfg)
        self._runner = _Runner(self.cfg, self.env, selected=set(), refresh=set())
        return self

    def stage(self, kind: str, name: str, inputs: dict[str, "StageOutput | str"] | None = None,
              **settings) -> StageOutput:
        """Run one stage (or take it from cache); see the module docstring."""
        from pydantic import ValidationError

        from flows.config import INSTANCE_MODELS, ConfigError, format_validation_error, instance_settings
        from flows.graph import instance_problems, producer_of

        stage_kind = get(kind)
        if name in self._producers:
            raise ConfigError(f"stages.{name}: this run already has a stage named {name!r}")
        wired = {slot: value.name if isinstance(value, StageOutput) else value for slot, value in (inputs or {}).items()}
        try:
            instance = INSTANCE_MODELS[kind].model_validate({"kind": kind, "inputs": wired, **settings})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"stage {name}")) from None
        problems = instance_problems(name, instance, self._producers, list(self._producers))
        if problems:
            raise ConfigError("\n".join(problems))
        node = Node(name=name, instance=name, kind=stage_kind, settings=instance_settings(instance),
                    stage_inputs={s: v for s, v in wired.items() if v in self._producers},
                    model_inputs={s: v for s, v in wired.items() if v not in self._producers})
        self._runner.cfg = self.cfg.model_copy(update={"stages": {**self.cfg.stages, name: instance}})
        self.cfg = self._runner.cfg
        self._runner.selected.add(name)
        ref = self._runner(node, self._outputs)
        self._outputs[name], self._producers[name] = ref, producer_of(instance)
        return StageOutput(name, stage_kind.output, ref, self._runner.outcomes[-1]["metrics"])

    def __exit__(self, exc_type, exc, tb) -> None:
        from flows.lineage import close_pipeline_run

        self.summary = close_pipeline_run(self.cfg, self.env, self._runner.outcomes, exc)
