"""The recipe: one typed model. Its `stages` name stage instances, each with a kind (tasks/kinds/), its
settings and its inputs by name; together they form the graph the flow runs.

    stages:
      data: {kind: prepare_data, sft: {source: demos.jsonl}, preference: {source: pairs.jsonl}}
      sft:  {kind: sft, inputs: {data: data, base: Qwen/Qwen2.5-0.5B}, training: {epochs: 2}}
      dpo:  {kind: dpo, inputs: {data: data, policy: sft}, beta: 0.1}

An input names another instance (its output) or an external model: a Hub id (org/name, optionally
@revision), a local folder, an fsspec URI (s3://...) or an MLflow registry model (models:/name@alias).
`extends: other.yaml` reads another recipe first and lays this one over it (`merge_recipes`): the demo with
RLHF (configs/demo-rlhf.yaml) is the demo with one instance replaced.
A recipe without `stages` is the classic chain (sections data, pretrain, sft, reward, align, evaluate, and
`promote: {enabled: true}` for a promote stage behind the gate),
expanded into the same graph (`expand_chain`): the recipes of earlier versions keep working.

`--set a.b=value` overrides any field (the value is read as YAML, so `--set align.beta=0.2` gives a float);
in a graph recipe `--set sft.training.epochs=2` is short for `--set stages.sft.training.epochs=2`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from flows.graph import graph_problems, instance_settings  # noqa: F401 - instance_settings is re-exported
from tasks.machinery.stagekind import StageKind
from tasks.kinds import kinds
from tasks.machinery.ray_engine import RaySettings
from tasks.machinery.store import state_home
from tasks.machinery.training import Section

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
CHAIN_SECTIONS = ("data", "pretrain", "sft", "reward", "align", "evaluate", "promote")


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the field path."""


class ModelConfig(Section):
    base: str | None = Field(
        None,
        description="Chain recipes: the base model when pretrain is disabled: Hub id (org/name), local "
        "save_pretrained folder or fsspec URI (s3://bucket/model). Graph recipes name models as inputs.",
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


class OrchestrationConfig(Section):
    retries: int = Field(3, ge=0, description="Retries of a stage that failed with a transient error (I/O, network, "
                         "HTTP 5xx, timeouts); bad config or data fail at once.")
    retry_delay_seconds: list[float] = Field(
        default_factory=lambda: [10.0, 60.0, 300.0],
        description="Backoff before each retry (the last value repeats).",
    )
    stage_pools: dict[str, str] = Field(
        default_factory=dict,
        description="Send a stage instance to another Prefect work pool, e.g. {sft: k8s-gpu, evaluate: cpu}: it "
        "runs as a flow run of the deployment posttrain-stage/<pool> (created by `posttrain deploy`), and "
        "independent instances on pools run concurrently. Instances not listed run inside the pipeline's own "
        "process, one at a time. Needs a shared storage.root (S3) and tracking.uri.",
    )
    engine: Literal["local", "ray"] = Field(
        "local", description="Where a stage's heavy work runs: 'local' (this process, or torchrun/accelerate "
        "with training.processes) or 'ray': training data-parallel on Ray Train workers and generation spread "
        "over Ray tasks (needs the [ray] extra; see orchestration.ray).")
    stage_engines: dict[str, Literal["local", "ray"]] = Field(
        default_factory=dict, description="The engine per stage instance, over `engine`, e.g. {sft: ray, dpo: ray}.")
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster and the resources "
                             "stages on it use.")

    def ray_settings(self, instance: str) -> dict | None:
        """The Ray settings a stage instance runs with, or None when it runs locally."""
        if self.stage_engines.get(instance, self.engine) != "ray":
            return None
        return self.ray.for_stage(instance)


def _instance_model(kind: StageKind) -> type[Section]:
    """A recipe instance of `kind`: the kind's typed settings plus kind, inputs and rounds."""
    return create_model(
        f"{kind.config.__name__.removesuffix('Config')}Instance",
        __base__=kind.config,
        __doc__=kind.description,
        kind=(Literal[kind.name], Field(description=f"Stage kind {kind.name}: {kind.description}")),
        inputs=(dict[str, str], Field(
            default_factory=dict,
            description="Inputs by slot: another instance's name, or a model (Hub id org/name[@revision], local "
            "path, s3:// URI, models:/name@alias). Slots: " + (", ".join(
                f"{n} ({s.type}{'' if s.required else ', optional'})" for n, s in kind.inputs.items()) or "none")
            + (f"; any other name: a {kind.more_inputs.type}" if kind.more_inputs else "") + ".")),
        rounds=(int, Field(1, ge=1, description="Repeat this stage: round k starts from round k-1's output; later "
                           "stages read the last round. Raising it reuses the rounds already done.")),
    )


INSTANCE_MODELS = {name: _instance_model(kind) for name, kind in kinds().items()}
StageInstance = Annotated[Union[tuple(INSTANCE_MODELS.values())], Field(discriminator="kind")]


class PipelineConfig(Section):
    name: str = Field("posttrain", description="Pipeline name; the MLflow parent run is named after it.")
    seed: int = Field(0, description="Seed for data splits, initialisation, sampling and training order.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model loading.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Where artifacts are kept.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    stages: dict[str, StageInstance] = Field(
        description="Stage instances by name, in any order: each has a kind, its settings and its inputs."
    )
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Where stages run (work pools)."
    )

    @model_validator(mode="before")
    @classmethod
    def _chain_recipes_expand(cls, tree: Any) -> Any:
        if isinstance(tree, dict) and "stages" not in tree:
            return expand_chain(tree)
        if isinstance(tree, dict):
            mixed = sorted(set(tree) & set(CHAIN_SECTIONS))
            if mixed:
                raise ValueError(f"{', '.join(mixed)}: chain sections cannot be combined with `stages`; "
                                 "give those stages as instances under `stages`")
        return tree

    @field_validator("stages")
    @classmethod
    def _names_are_safe(cls, stages: dict) -> dict:
        for name in stages:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"{name!r}: a stage name is letters, digits, _ and - only")
            if name in ("eval", "system"):
                raise ValueError(f"{name!r}: reserved (the run's metrics name evaluations eval/<model>/... and "
                                 f"MLflow's system metrics system/...); choose another stage name")
        if not stages:
            raise ValueError("a recipe names at least one stage")
        return stages

    @model_validator(mode="after")
    def _graph_is_sound(self) -> "PipelineConfig":
        problems = graph_problems(self)
        o = self.orchestration
        for setting, names in (("stage_pools", o.stage_pools), ("stage_engines", o.stage_engines),
                               ("ray.stages", o.ray.stages)):
            unknown = sorted(set(names) - set(self.stages))
            if unknown:
                problems.append(f"orchestration.{setting}: {', '.join(unknown)} is no stage of this recipe "
                                f"(stages: {', '.join(self.stages)})")
        if any(o.ray_settings(name) for name in self.stages):
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                problems.append("orchestration.engine ray: Ray is not installed; pip install -e \".[ray]\"")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def without_credentials(self) -> "PipelineConfig":
        """A copy safe to store as Prefect parameters: a password in tracking.uri moves to this process's
        MLFLOW_TRACKING_URI, where resolved() finds it again."""
        from tasks.machinery.tracking import strip_credentials

        uri = self.tracking.uri
        if not uri or uri == strip_credentials(uri):
            return self
        os.environ["MLFLOW_TRACKING_URI"] = uri
        return self.model_copy(update={"tracking": self.tracking.model_copy(update={"uri": strip_credentials(uri)})},
                               deep=True)

    def resolved(self) -> "PipelineConfig":
        """A copy with the defaults that depend on the environment filled in."""
        from tasks.machinery.tracking import with_local_credentials

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

    def data_sources(self) -> dict[str, Any]:
        """Every external data source the recipe reads, as {instance.kind.index: DatasetSource}."""
        return {f"{name}.{where}": src for name, inst in self.stages.items() if inst.kind == "prepare_data"
                for where, src in inst.named_sources().items()}


def expand_chain(tree: dict) -> dict:
    """A classic chain recipe (data -> [pretrain] -> sft -> reward -> align -> evaluate) as stage instances,
    named after their sections so that summaries, pools and fault points keep their names."""
    tree = dict(tree)
    section = lambda name: dict(tree.pop(name, None) or {})  # noqa: E731
    data, pretrain, sft, reward, align, evaluate, promote = (section(n) for n in CHAIN_SECTIONS)
    use_pretrain = pretrain.pop("enabled", False)
    if use_pretrain:
        base = "pretrain"
    else:
        base = (tree.get("model") or {}).get("base")
        if not base:
            raise ValueError("model.base must name a base model when pretrain.enabled is false")
    method = align.pop("method", "dpo")
    if method not in ("dpo", "rlhf"):
        raise ValueError(f"align.method: {method!r} is not an alignment method of the chain (dpo, rlhf)")
    method_settings = dict(align.pop(method, None) or {})
    align.pop("rlhf" if method == "dpo" else "dpo", None)
    stages = {"prepare_data": {"kind": "prepare_data", **data}}
    if use_pretrain:
        stages["pretrain"] = {"kind": "pretrain", **pretrain}
    stages["sft"] = {"kind": "sft", "inputs": {"data": "prepare_data", "base": base}, **sft}
    stages["reward"] = {"kind": "reward", "inputs": {"data": "prepare_data", "init": "sft"}, **reward}
    stages["align"] = {"kind": method, **method_settings, **align,
                       "inputs": {"data": "prepare_data", "policy": "sft",
                                  **({"reward": "reward"} if method == "rlhf" else {})}}
    stages["evaluate"] = {"kind": "evaluate", **evaluate, "inputs": {
        "data": "prepare_data", "reward": "reward", "base": base, "sft": "sft", "policy": "align"}}
    if promote.pop("enabled", False):
        stages["promote"] = {"kind": "promote", **promote,
                             "inputs": {"policy": "align", "report": "evaluate", "data": "prepare_data"}}
    return {**tree, "stages": stages}


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
        loc = list(e["loc"])
        if len(loc) > 2 and loc[0] == "stages" and loc[2] in INSTANCE_MODELS:
            del loc[2]  # the kind pydantic dispatched on, not a field of the recipe
        path = ".".join(str(p) for p in loc)
        shown = e["type"] not in ("missing", "value_error") and not isinstance(e.get("input"), (dict, list))
        got = f" (got {e.get('input')!r})" if shown else ""
        message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {message}{got}" if path else f"  {message}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML recipe (default configs/demo.yaml) and the recipes it extends, apply dotted overrides,
    validate."""
    path = recipe_path(path) if path else DEFAULT_RECIPE
    return validate_recipe(read_recipe(path), overrides, str(path))


def read_recipe(path: Path, extended_by: tuple[Path, ...] = ()) -> dict:
    """A recipe file's tree, with `extends: other.yaml` resolved: the other recipe (a path relative to this
    file, or to the project) is read first and this file's tree laid over it (`merge_recipes`)."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        where = f" (extended by {extended_by[-1]})" if extended_by else ""
        raise ConfigError(f"{path}: recipe not found{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the recipe must be a mapping of sections")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: extends: expected the path of one recipe, got {parent!r}")
    parent_path = path.parent / parent
    parent_path = (parent_path if parent_path.exists() else recipe_path(parent)).resolve()
    chain = (*extended_by, path.resolve())
    if parent_path in chain:
        raise ConfigError(f"{path}: extends {parent}, which extends it again: "
                          + " -> ".join(str(p) for p in (*chain, parent_path)))
    return merge_recipes(read_recipe(parent_path, chain), tree, str(path))


def merge_recipes(base: dict, over: dict, origin: str) -> dict:
    """`over` laid over `base`: sections merge key by key, values and lists replace. Under `stages` an
    instance of another kind replaces the base's instance whole (its settings belong to the old kind), and
    an instance set to null is dropped."""
    merged = _merged(base, {key: value for key, value in over.items() if key != "stages"})
    if "stages" not in over:
        return merged
    if not isinstance(over["stages"], dict) or not isinstance(base.get("stages"), dict):
        return {**merged, "stages": over["stages"]}
    stages = dict(base["stages"])
    for name, instance in over["stages"].items():
        old = stages.get(name)
        if instance is None:
            if name not in stages:
                raise ConfigError(f"{origin}: stages.{name}: null drops a stage of the extended recipe, which has "
                                  f"none of that name (stages: {', '.join(stages)})")
            del stages[name]
        elif isinstance(old, dict) and isinstance(instance, dict) and instance.get("kind", old.get("kind")) == \
                old.get("kind"):
            stages[name] = _merged(old, instance)
        else:
            stages[name] = instance
    return {**merged, "stages": stages}


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if isinstance(base.get(key), dict) and isinstance(value, dict) else value
    return out


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """The recipe tree with `--set` overrides applied (a copy)."""
    import copy

    tree = copy.deepcopy(tree)
    for item in overrides:
        key, value = parse_override(item)
        first = key.split(".")[0]
        stages = tree.get("stages")
        if isinstance(stages, dict):
            hint = _chain_form_hint(key, stages)
            if hint:
                raise ConfigError(f"--set {key}: {hint}")
            if first in stages and first not in PipelineConfig.model_fields:
                key = f"stages.{key}"  # --set sft.training.epochs=2 in a graph recipe
        _set_dotted(tree, key, value)
    return tree


def _chain_form_hint(key: str, stages: dict) -> str | None:
    """What a chain-form override (the demo's form before it became a graph) is called in a graph recipe."""
    parts = key.split(".")
    if parts[0] == "data" and "data" not in stages and "prepare_data" in stages:
        return f"this recipe's data stage is named prepare_data: --set prepare_data.{'.'.join(parts[1:])}"
    instance = stages.get(parts[0])
    kind = instance.get("kind") if isinstance(instance, dict) else None
    if kind not in INSTANCE_MODELS or len(parts) < 2 or parts[1] in INSTANCE_MODELS[kind].model_fields:
        return None
    if parts[1] == kind and len(parts) > 2:
        return f"a graph instance's settings are its own: --set {parts[0]}.{'.'.join(parts[2:])}"
    if parts[1] in ("dpo", "rlhf") or parts[1:] == ["method"]:
        return f"stage {parts[0]} is of kind {kind}; another method is another kind of instance, e.g. " \
               "--config configs/demo-rlhf.yaml (the demo with RLHF), or a recipe that extends this one"
    if parts[1:] == ["enabled"]:
        return f"a graph recipe runs the stages it names; to leave {parts[0]} out, write a recipe that extends " \
               f"this one with `stages: {{{parts[0]}: null}}`"
    return None


def validate_recipe(tree: dict, overrides: list[str] = (), origin: str = "recipe") -> PipelineConfig:
    """A recipe tree (plus overrides) as a validated PipelineConfig, or a ConfigError naming every problem."""
    try:
        return PipelineConfig.model_validate(apply_overrides(tree, list(overrides)))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None


def recipe_path(recipe: str | Path) -> Path:
    """A recipe named by path, or by name relative to the project (configs/demo.yaml)."""
    path = Path(recipe).expanduser()
    if not path.is_absolute() and not path.exists():
        path = DEFAULT_RECIPE.parent.parent / recipe
    return path
