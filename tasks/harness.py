"""Standard benchmark tasks through EleutherAI's lm-evaluation-harness, on any model an `evaluate` stage has.

Hub tasks (hellaswag, gsm8k, ...) run where the Hub is reachable; custom local tasks run offline: a folder of
task YAMLs (the harness's own format) with their data files beside them. A relative `data_files` path in a
local task resolves against the YAML's folder (the harness itself would resolve it against the working
directory), and the folder's content is a stage input, so editing a task or its data reruns the evaluation.

Metric names are mapped to names MLflow accepts: `<model>/harness/<task>/<metric>[/<filter>]`, e.g. the
harness's `exact_match,strict-match` of task gsm8k -> `policy/harness/gsm8k/exact_match/strict-match`
(the filter `none` is left out; `<metric>_stderr` likewise).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml
from pydantic import Field

from tasks.training import Section

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class HarnessSettings(Section):
    tasks: list[str] = Field(min_length=1, description="Task (or group) names: the harness's own (Hub data) or "
                             "those defined in `include_path`.")
    include_path: str | None = Field(None, description="A folder of custom task YAMLs and their data files (relative "
                                     "to the project or absolute); its content is a stage input.")
    models: list[str] | None = Field(None, description="The evaluate inputs to run the tasks on (default: all).")
    limit: int | None = Field(None, ge=1, description="At most this many documents per task (None: all).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt (None: each task's own).")
    batch_size: int = Field(16, ge=1, description="Requests per forward pass.")
    apply_chat_template: bool = Field(False, description="Wrap each request in the model's chat template (for "
                                      "chat-tuned models on tasks written as plain text).")
    bootstrap_iters: int = Field(1000, ge=0, description="The harness's bootstrap resamples for each stderr.")


class _Tagged:
    """A YAML node with a custom tag (`!function utils.process`), kept as written."""

    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_multi_constructor("!", lambda loader, suffix, node: _Tagged(
    "!" + suffix, loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else
    loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)))
_Dumper.add_representer(_Tagged, lambda dumper, t: (
    dumper.represent_scalar(t.tag, t.value) if isinstance(t.value, str) else
    dumper.represent_sequence(t.tag, t.value) if isinstance(t.value, list) else
    dumper.represent_mapping(t.tag, t.value)))


def task_folder(path: str, project_root: Path) -> Path:
    """The custom task folder: a path as given, or relative to the project (configs/harness/arithmetic)."""
    folder = Path(path).expanduser()
    if not folder.is_absolute() and not folder.exists():
        folder = project_root / path
    if not folder.is_dir():
        raise ValueError(f"evaluate.harness.include_path: {folder} is not a folder")
    if not any(folder.rglob("*.yaml")):
        raise ValueError(f"evaluate.harness.include_path: {folder} holds no task YAML")
    return folder


def localized_tasks(folder: Path, into: Path) -> Path:
    """A copy of a custom task folder whose relative data_files point at the files beside each YAML."""
    shutil.copytree(folder, into, dirs_exist_ok=True)
    for path in into.rglob("*.yaml"):
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        files = (config or {}).get("dataset_kwargs", {}).get("data_files") if isinstance(config, dict) else None
        if files is None:
            continue
        original = folder / path.relative_to(into).parent

        def absolute(value):
            if isinstance(value, list):
                return [absolute(v) for v in value]
            if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                if not (original / value).exists():
                    raise ValueError(f"{folder / path.relative_to(into)}: data file {value!r} is not beside the task "
                                     f"({original / value} does not exist)")
                return str(original / value)
            return value

        config["dataset_kwargs"]["data_files"] = (
            {split: absolute(v) for split, v in files.items()} if isinstance(files, dict) else absolute(files))
        path.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False), encoding="utf-8")
    return into


def needs_builtin_tasks(requested: list[str], folder: str | None) -> bool:
    """Whether the requested tasks (or a local group's members) reach beyond the custom folder's definitions."""
    defined, referenced = set(), set(requested)
    for path in Path(folder).rglob("*.yaml") if folder else ():
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        if not isinstance(config, dict):
            continue
        for key in ("task", "group", "tag"):
            value = config.get(key)
            if isinstance(value, str):
                defined.add(value)
            elif isinstance(value, list):
                target = referenced if key == "task" else defined
                target.update(v if isinstance(v, str) else v.get("task", "")
                              for v in value if isinstance(v, (str, dict)))
    return not referenced <= defined


def metric_name(model: str, task: str, key: str) -> str | None:
    """The harness's `metric,filter` result key as an MLflow metric name (None for its bookkeeping fields)."""
    from tasks.tracking import sanitize_metric_name

    if "," not in key:
        return None
    metric, _, flt = key.partition(",")
    name = f"{model}/harness/{task}/{metric}" + ("" if flt in ("none", "") else f"/{flt}")
    return sanitize_metric_name(name)


def run_harness(cfg: HarnessSettings, models: dict[str, Path | str], out: Path, seed: int,
                trust_remote_code: bool = False, dtype: str = "auto") -> dict[str, float]:
    """Run the tasks on each chosen model; results (the harness's own JSON) under out/harness/<model>.json."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tasks.modeling import accelerator, free, load_causal_lm, load_tokenizer

    chosen = cfg.models or list(models)
    unknown = [m for m in chosen if m not in models]
    if unknown:
        raise ValueError(f"evaluate.harness.models: {unknown} are not inputs of this stage (it has {list(models)})")
    (out / "harness").mkdir(exist_ok=True)
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        include = None
        if cfg.include_path:
            include = str(localized_tasks(task_folder(cfg.include_path, PROJECT_ROOT), Path(tmp) / "tasks"))
        # the harness indexes its thousands of built-in task files only when a task is not a local one (seconds)
        manager = TaskManager(include_path=include, include_defaults=needs_builtin_tasks(cfg.tasks, include))
        for name in chosen:
            model = load_causal_lm(models[name], trust_remote_code, dtype, on_device=True)
            tokenizer = load_tokenizer(models[name], trust_remote_code)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=accelerator())
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(cfg.tasks), task_manager=manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                bootstrap_iters=cfg.bootstrap_iters, log_samples=False, apply_chat_template=cfg.apply_chat_template,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            free(model)
            kept = {k: results[k] for k in ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better")
                    if k in results}
            (out / "harness" / f"{name}.json").write_text(json.dumps(kept, indent=2, default=str))
            for task, values in results["results"].items():
                for key, value in values.items():
                    metric = metric_name(name, task, key)
                    if metric is not None and isinstance(value, (int, float)):
                        metrics[metric] = float(value)
    return metrics


def harness_sources(cfg: HarnessSettings | None) -> dict[str, dict]:
    """The custom task folder's content as a stage input (its digest in the cache key)."""
    from tasks.sources import file_digest
    from tasks.store import digest_json

    if cfg is None or not cfg.include_path:
        return {}
    folder = task_folder(cfg.include_path, PROJECT_ROOT)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = digest_json([[p.relative_to(folder).as_posix(), file_digest(p)] for p in files])
    return {"harness.tasks": {"uri": str(folder.resolve()), "digest": digest, "kind": "source"}}
