"""The pipeline's configuration: one typed model composed of the stages' own sections.

Recipes are YAML files in configs/; `--set a.b=value` overrides any field (the value is read as
YAML, so `--set align.beta=0.2` gives a float and `--set sft.training.lora.enabled=true` a bool).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tasks.align import AlignConfig
from tasks.data import DataConfig
from tasks.evaluate import EvaluateConfig
from tasks.pretrain import PretrainConfig
from tasks.reward import RewardStageConfig
from tasks.sft import SFTStageConfig
from tasks.store import state_home
from tasks.training import Section

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the field path."""


class ModelConfig(Section):
    base: str | None = Field(
        None,
        description="Base model when pretrain is disabled: Hub id (org/name), local save_pretrained folder "
        "or fsspec URI (s3://bucket/model).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model's repository to run.")


class StorageConfig(Section):
    root: str | None = Field(
        None, description="Artifact store root: a local path or s3://bucket/prefix. Default: $POSTTRAIN_HOME/artifacts."
    )


class TrackingConfig(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (http(s)://..., sqlite:///...). Default: $MLFLOW_TRACKING_URI, else "
        "sqlite under $POSTTRAIN_HOME.",
    )
    experiment: str = Field("posttrain", description="MLflow experiment name.")
    log_model_max_mb: float = Field(
        500.0, ge=0, description="Upload the final policy to MLflow when at most this big; else log it by reference."
    )


STAGES = ("prepare_data", "pretrain", "sft", "reward", "align", "evaluate")


class OrchestrationConfig(Section):
    retries: int = Field(3, ge=0, description="Retries of a stage that failed with a transient error (I/O, network, "
                         "HTTP 5xx, timeouts); bad config or data fail at once.")
    retry_delay_seconds: list[float] = Field(
        default_factory=lambda: [10.0, 60.0, 300.0],
        description="Backoff before each retry (the last value repeats).",
    )
    stage_pools: dict[str, str] = Field(
        default_factory=dict,
        description="Send a stage to another Prefect work pool, e.g. {sft: k8s-gpu, evaluate: cpu}: the stage "
        "runs as a flow run of the deployment posttrain-stage/<pool> (created by `posttrain deploy`). Stages "
        "not listed run inside the pipeline's own process. Needs a shared storage.root (S3) and tracking.uri.",
    )

    @field_validator("stage_pools")
    @classmethod
    def _known_stages(cls, pools: dict[str, str]) -> dict[str, str]:
        unknown = set(pools) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
        return pools


class PipelineConfig(Section):
    name: str = Field("posttrain", description="Pipeline name; the MLflow parent run is named after it.")
    seed: int = Field(0, description="Seed for data splits, initialisation, sampling and training order.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Where artifacts are kept.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data sets and their preparation.")
    pretrain: PretrainConfig = Field(
        default_factory=lambda: PretrainConfig(enabled=False),
        description="Optional from-scratch base model (the demo's; real recipes use model.base).",
    )
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig, description="Supervised fine-tuning.")
    reward: RewardStageConfig = Field(default_factory=RewardStageConfig, description="Reward modelling.")
    align: AlignConfig = Field(default_factory=AlignConfig, description="Alignment: DPO or RLHF.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation.")
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Where stages run (work pools)."
    )

    @model_validator(mode="after")
    def _base_model_named(self) -> "PipelineConfig":
        if not self.pretrain.enabled and not self.model.base:
            raise ValueError("model.base must name a base model when pretrain.enabled is false")
        for kind in ("sft", "preference", "eval"):
            if getattr(self.data, kind) is None:
                raise ValueError(f"data.{kind} is required: the pipeline's stages read it")
        return self

    def without_credentials(self) -> "PipelineConfig":
        """A copy safe to store as Prefect parameters: a password in tracking.uri moves to this process's
        MLFLOW_TRACKING_URI, where resolved() finds it again."""
        from tasks.tracking import strip_credentials

        uri = self.tracking.uri
        if not uri or uri == strip_credentials(uri):
            return self
        os.environ["MLFLOW_TRACKING_URI"] = uri
        return self.model_copy(update={"tracking": self.tracking.model_copy(update={"uri": strip_credentials(uri)})},
                               deep=True)

    def resolved(self) -> "PipelineConfig":
        """A copy with the defaults that depend on the environment filled in."""
        from tasks.tracking import with_local_credentials

        home = state_home()
        tracking_uri = self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow.db"
        tracking_uri = with_local_credentials(tracking_uri)
        return self.model_copy(
            update={
                "storage": self.storage.model_copy(update={"root": self.storage.root or str(home / "artifacts")}),
                "tracking": self.tracking.model_copy(update={"uri": tracking_uri}),
            },
            deep=True,
        )


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot read value {raw!r}: {e}") from None
    return key.strip(), value


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} problem(s) in the configuration"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        shown = e["type"] != "missing" and not isinstance(e.get("input"), (dict, list))
        got = f" (got {e.get('input')!r})" if shown else ""
        message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {message}{got}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML recipe (default configs/demo.yaml), apply dotted overrides, validate."""
    path = Path(path) if path else DEFAULT_RECIPE
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the recipe must be a mapping of sections")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None
