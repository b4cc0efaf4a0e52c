"""Pages generated from the code when the site is built (mkdocs-gen-files): one page per stage kind (its
inputs, output, headline metrics and every setting of its typed config) and the recipe's top-level settings.
Every field must carry a description; a field without one stops the build."""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.config import PipelineConfig  # noqa: E402
from tasks.machinery.stagekind import VALUE_TYPES
from tasks.kinds import kinds  # noqa: E402


class MissingDescription(RuntimeError):
    pass


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin in (list, tuple, set):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {type_name(args[0])} to {type_name(args[1])}" if args else "map"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "see below"
    try:
        text = json.dumps(value)
    except TypeError:
        text = str(value)
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def nested_models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in nested_models(a)]


def rows(model: type[BaseModel], prefix: str, where: str, seen: tuple = ()) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if not field.description:
            raise MissingDescription(f"{where}: setting {key!r} ({model.__module__}.{model.__name__}) has no "
                                     "description")
        description = " ".join(field.description.split()).replace("|", "\\|")
        lines.append(f"| `{key}` | {type_name(field.annotation)} | {default_text(field)} | {description} |")
        for sub in nested_models(field.annotation):
            if sub not in seen:
                many = typing.get_origin(field.annotation) in (list, dict)
                lines += rows(sub, f"{key}{'[]' if many else ''}.", where, (*seen, sub))
    return lines


def table(model: type[BaseModel], where: str, skip: tuple[str, ...] = ()) -> str:
    body = [r for r in rows(model, "", where) if not any(r.startswith(f"| `{s}") for s in skip)]
    return "| setting | type | default | description |\n|---|---|---|---|\n" + "\n".join(body) + "\n"


def kind_page(kind) -> str:
    slots = "\n".join(f"| `{name}` | {slot.type} | {'yes' if slot.required else 'no'} | {slot.description} |"
                      for name, slot in kind.inputs.items())
    more = (f"\nAny other input name is accepted as a **{kind.more_inputs.type}**: {kind.more_inputs.description}\n"
            if kind.more_inputs else "")
    headline = ", ".join(f"`{h}`" for h in kind.headline) or "none"
    source = kind.module.replace(".", "/") + ".py"
    return f"""# {kind.name}

{kind.description}

Module: `{source}`. In a recipe: `kind: {kind.name}` under `stages:` (see [Recipes](../concepts/recipes.md)).

## Inputs

| input | type | required | what |
|---|---|---|---|
{slots}
{more}
## Output

**{kind.output}**: {VALUE_TYPES[kind.output]}.

Headline metrics (the run summary and the MLflow parent run show these): {headline}.
{"" if not kind.acts_on_world else chr(10) + "This kind acts on the world (the model registry): a reproduction replays its decision against the state the original run recorded and changes nothing." + chr(10)}
## Settings

Generated from `{kind.config.__module__}.{kind.config.__name__}`; dotted keys are nested sections
(`training.learning_rate` is `training: {{learning_rate: ...}}`), `[]` marks the items of a list.

{table(kind.config, f"stage kind {kind.name}")}"""


def generate() -> None:
    import mkdocs_gen_files

    registry = kinds()
    for name, kind in registry.items():
        with mkdocs_gen_files.open(f"kinds/{name}.md", "w") as f:
            f.write(kind_page(kind))
    with mkdocs_gen_files.open("kinds/index.md", "w") as f:
        f.write("# Stage kinds\n\nEvery kind a recipe can name, with its inputs, output and settings.\n\n"
                "| kind | output | what |\n|---|---|---|\n"
                + "".join(f"| [{n}]({n}.md) | {k.output} | {k.description.split('. ')[0].rstrip('.')}. |\n"
                          for n, k in registry.items()))
    with mkdocs_gen_files.open("reference/recipe-settings.md", "w") as f:
        f.write("# Recipe settings\n\nThe top level of a recipe, generated from `flows.config.PipelineConfig`. Each "
                "entry of `stages` is a stage instance: `kind`, `inputs`, and the kind's settings (see "
                "[Stage kinds](../kinds/index.md)).\n\n" + table(PipelineConfig, "the recipe", skip=("stages",)))


if __name__ in ("<run_path>", "__main__"):  # run by mkdocs-gen-files during the build (tests import it)
    generate()
