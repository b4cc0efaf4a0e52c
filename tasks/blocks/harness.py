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
from pathlib import Path

import yaml
from pydantic import Field

from tasks.machinery.training import Section

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


def task_folder(path: str) -> Path:
    """The custom task folder: a path as given, or relative to the project (configs/harness/arithmetic)."""
    folder = Path(path).expanduser()
    if not folder.is_absolute() and not folder.exists():
        folder = PROJECT_ROOT / path
    if not folder.is_dir():
        raise ValueError(f"evaluate.harness.include_path: {folder} is not a folder")
    if not any(folder.rglob("*.yaml")):
        raise ValueError(f"evaluate.harness.include_path: {folder} holds no task YAML")
    return folder


def _task_configs(folder: Path):
    """(path, parsed YAML) of each task file in a folder, custom tags kept."""
    for path in sorted(folder.rglob("*.yaml")):
        yield path, yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)


def localized_tasks(folder: Path, into: Path) -> Path:
    """The task YAMLs of a custom folder (and the Python files their `!function`s name) copied into `into`, each
    relative data_files path made absolute: the file beside the YAML. The data files themselves stay put."""
    for path, config in _task_configs(folder):
        target = into / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        files = config.get("dataset_kwargs", {}).get("data_files") if isinstance(config, dict) else None
        if files is None:
            shutil.copyfile(path, target)
            continue

        def absolute(value):
            if isinstance(value, list):
                return [absolute(v) for v in value]
            if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                if not (path.parent / value).exists():
                    raise ValueError(f"{path}: data file {value!r} is not beside the task "
                                     f"({path.parent / value} does not exist)")
                return str(path.parent / value)
            return value

        config["dataset_kwargs"]["data_files"] = (
            {split: absolute(v) for split, v in files.items()} if isinstance(files, dict) else absolute(files))
        target.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False), encoding="utf-8")
    for module in folder.rglob("*.py"):
        (into / module.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(module, into / module.relative_to(folder))
    return into


def needs_builtin_tasks(requested: list[str], folder: Path | None) -> bool:
    """Whether the requested tasks (or a local group's members) reach beyond the custom folder's definitions."""
    defined, referenced = set(), set(requested)
    for _, config in _task_configs(folder) if folder else ():
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
    from tasks.machinery.tracking import sanitize_metric_name

    if "," not in key:
        return None
    metric, _, flt = key.partition(",")
    name = f"{model}/harness/{task}/{metric}" + ("" if flt in ("none", "") else f"/{flt}")
    return sanitize_metric_name(name)


class Harness:
    """The harness's tasks, set up once for an evaluate stage, then run on each chosen model while the stage has
    it loaded (no second load). The tasks as run (a custom folder's YAMLs, data paths made absolute) and the
    harness's own results per model are kept under out/harness/."""

    def __init__(self, cfg: HarnessSettings, models: list[str], out: Path, seed: int):
        from lm_eval.tasks import TaskManager

        self.cfg, self.seed, self.out = cfg, seed, out / "harness"
        self.chosen = cfg.models or list(models)
        unknown = [m for m in self.chosen if m not in models]
        if unknown:
            raise ValueError(f"evaluate.harness.models: {unknown} are not inputs of this stage (it has {models})")
        include = localized_tasks(task_folder(cfg.include_path), self.out / "tasks") if cfg.include_path else None
        # the harness indexes its thousands of built-in task files only when a task is not a local one (seconds)
        self.manager = TaskManager(include_path=str(include) if include else None,
                                   include_defaults=needs_builtin_tasks(cfg.tasks, include))

    def run(self, name: str, model, tokenizer) -> dict[str, float]:
        """The tasks on one model: its metrics (none for a model the settings leave out)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        from tasks.machinery.modeling import accelerator

        if name not in self.chosen:
            return {}
        cfg = self.cfg
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=accelerator())
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.tasks), task_manager=self.manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            bootstrap_iters=cfg.bootstrap_iters, log_samples=False, apply_chat_template=cfg.apply_chat_template,
            random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=self.seed,
            fewshot_random_seed=self.seed)
        kept = {k: results[k] for k in ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better")
                if k in results}
        (self.out / f"{name}.json").write_text(json.dumps(kept, indent=2, default=str))
        metrics = {}
        for task, values in results["results"].items():
            for key, value in values.items():
                metric = metric_name(name, task, key)
                if metric is not None and isinstance(value, (int, float)):
                    metrics[metric] = float(value)
        return metrics


def harness_sources(cfg: HarnessSettings | None) -> dict[str, dict]:
    """The custom task folder's content as a stage input (its digest in the cache key)."""
    from tasks.machinery.fingerprints import file_digest
    from tasks.machinery.store import digest_json

    if cfg is None or not cfg.include_path:
        return {}
    folder = task_folder(cfg.include_path)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = digest_json([[p.relative_to(folder).as_posix(), file_digest(p)] for p in files])
    return {"harness.tasks": {"uri": str(folder.resolve()), "digest": digest, "kind": "source"}}
