"""`synthesize` stage: synthetic instruction data from a teacher, filtered by quality (the Phi recipe).

Prompts are the product topics x audiences x styles x templates (lists in the recipe, or files with one entry per
line), a seeded sample of them when `max_prompts` is set. A template is a `{{topic}}` / `{{audience}}` /
`{{style}}` text or a registered prompt (`prompts:/name/version`, `prompts:/name@alias`: see prompt_search).
A teacher answers each prompt `samples` times: the `teacher` input (a local Hugging Face model, a Hub id, or a
policy of this pipeline) or an OpenAI-compatible endpoint. The filter keeps what is worth learning from:

  exact duplicates (normalized prompt + reply) -> evaluation prompts (the optional `data` input's eval split)
  -> a score below `threshold` from the scorer (any judge: a verifier rule, a reward model, a model, an endpoint)
  -> the `keep_per_prompt` best-scored distinct replies of each prompt.

The output is prepared data (sft/train, sft/eval), so an `sft` stage trains on it. Every row carries its
provenance (seed, topic, audience, style, template and its version, teacher, sample, score) in a `provenance`
column; synthesize/rows.jsonl keeps every generated reply with its score and why it was dropped.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from pathlib import Path

from pydantic import Field

from tasks.blocks.judges import JudgeSettings, judge_slots, missing_judge_input
from tasks.machinery.stagekind import Slot, StageKind
from tasks.blocks.teachers import TeacherSettings, teach
from tasks.machinery.training import Section

logger = logging.getLogger("posttrain")
STATE = "synthesize"
VARIABLES = ("topic", "audience", "style")
Entries = list[str] | str


class SynthesizeConfig(Section):
    topics: Entries = Field(description="What the prompts are about: a list, or a file (path or fsspec URI; a relative "
                            "path not found from the working folder is read from the project's) with one per line.")
    audiences: Entries = Field(default_factory=lambda: [""], description="Who the text is for (list or file).")
    styles: Entries = Field(default_factory=lambda: [""], description="How it is written (list or file).")
    templates: list[str] = Field(description="Prompt templates with {{topic}}, {{audience}}, {{style}}; or registered "
                                 "prompts prompts:/name/version or prompts:/name@alias.")
    max_prompts: int | None = Field(None, ge=1, description="A seeded sample of the combinations; all when unset.")
    samples: int = Field(1, ge=1, description="Replies the teacher writes per prompt.")
    teacher: TeacherSettings = Field(default_factory=TeacherSettings, description="Who writes the replies.")
    scorer: JudgeSettings | None = Field(None, description="Scores each reply (a verifier rule, a reward model, a "
                                         "model or an endpoint judge); none: every reply scores 1.")
    threshold: float = Field(0.5, description="Keep replies whose score is at least this.")
    keep_per_prompt: int = Field(1, ge=1, description="Best-scored distinct replies kept per prompt.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of the kept prompts held out (sft/eval).")
    min_rows: int = Field(1, ge=1, description="Refuse to finish with fewer kept rows (with the counts).")



def input_problems(cfg: SynthesizeConfig, inputs: dict[str, str]) -> list[str]:
    problems = []
    if cfg.teacher.backend == "model" and "teacher" not in inputs:
        problems.append("teacher backend model reads the `teacher` input (a stage or a model reference)")
    problem = missing_judge_input([cfg.scorer], inputs) if cfg.scorer else None
    return problems + ([f"scorer: {problem}"] if problem else [])


def read_entries(value: Entries, what: str) -> list[str]:
    """A recipe list, or the non-empty lines of a file (local path or fsspec URI)."""
    if isinstance(value, list):
        return value
    import fsspec

    if "://" not in value and not Path(value).expanduser().exists():
        value = str(Path(__file__).resolve().parents[2] / value)  # relative to the project (configs/...)
    try:
        with fsspec.open(value, "r") as f:
            entries = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"synthesize {what}: no such file {value}") from None
    if not entries:
        raise ValueError(f"synthesize {what}: {value} has no entries")
    return entries


def resolve_templates(templates: list[str], tracking_uri: str | None) -> list[dict]:
    """Each template as {text, version}: an inline one versioned by its digest, a registered one by name/version."""
    from tasks.machinery import tracking
    from tasks.machinery.store import digest_json

    resolved = []
    for i, template in enumerate(templates):
        if template.startswith("prompts:/"):
            try:
                version = tracking.client(tracking_uri).load_prompt(template)
            except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing prompt
                raise ValueError(f"synthesize templates[{i}]: {template} is not in the MLflow prompt registry "
                                 f"({e})") from None
            text, name = version.template, f"prompts:/{version.name}/{version.version}"
        else:
            text, name = template, f"inline:{digest_json({'template': template})[:12]}"
        unknown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text)) - set(VARIABLES)
        if unknown:
            raise ValueError(f"synthesize templates[{i}] ({name}): unknown variable(s) {', '.join(sorted(unknown))}; "
                             f"templates use {{{{topic}}}}, {{{{audience}}}}, {{{{style}}}}")
        resolved.append({"index": i, "text": text, "version": name})
    return resolved


def build_prompts(cfg: SynthesizeConfig, templates: list[dict], seed: int) -> list[dict]:
    """The distinct rendered prompts with where each came from (topic, audience, style, template)."""
    from tasks.blocks.judge_prompts import render

    lists = {"topic": read_entries(cfg.topics, "topics"), "audience": read_entries(cfg.audiences, "audiences"),
             "style": read_entries(cfg.styles, "styles")}
    seen, prompts = set(), []
    for template, topic, audience, style in itertools.product(templates, lists["topic"], lists["audience"],
                                                              lists["style"]):
        text = re.sub(r"\s+", " ", render(template["text"], topic=topic, audience=audience, style=style)).strip()
        if text and text not in seen:
            seen.add(text)
            prompts.append({"text": text, "topic": topic, "audience": audience, "style": style,
                            "template": template["index"], "template_version": template["version"]})
    if cfg.max_prompts is not None and cfg.max_prompts < len(prompts):
        prompts = random.Random(f"{seed}-synthesize").sample(prompts, cfg.max_prompts)
    return prompts


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def synthesize(cfg: SynthesizeConfig, out: Path, seed: int, teacher=None, teacher_name: str = "", scorer=None,
               exclude: set[str] | None = None, tracking_uri: str | None = None,
               trust_remote_code: bool = False) -> dict[str, float]:
    """Build the prompts, ask the teacher, filter, write sft/train (and sft/eval) with provenance into `out`."""
    templates = resolve_templates(cfg.templates, tracking_uri)
    prompts = build_prompts(cfg, templates, seed)
    logger.info("[synthesize] %d prompts from %d templates; asking the teacher (%s) for %d repl%s each", len(prompts),
                len(templates), teacher_name, cfg.samples, "y" if cfg.samples == 1 else "ies")
    replies = teach(cfg.teacher, teacher, [p["text"] for p in prompts], cfg.samples, seed, trust_remote_code)
    rows, seen = [], set()
    counts = {"generated": 0, "empty_removed": 0, "duplicates_removed": 0, "eval_prompts_removed": 0,
              "below_threshold_removed": 0, "beyond_keep_per_prompt_removed": 0}
    excluded = {_normalized(p) for p in exclude or ()}
    for prompt, answers in zip(prompts, replies):
        for sample, reply in enumerate(answers):
            counts["generated"] += 1
            row = {**prompt, "sample": sample, "reply": reply, "teacher": teacher_name, "seed": seed}
            key = (_normalized(prompt["text"]), _normalized(reply))
            if not reply.strip():
                row["dropped"] = "empty_removed"
            elif key in seen:
                row["dropped"] = "duplicates_removed"
            elif key[0] in excluded:
                row["dropped"] = "eval_prompts_removed"
            seen.add(key)
            rows.append(row)
    live = [r for r in rows if "dropped" not in r]
    scores = (scorer.score([[{"role": "user", "content": r["text"]}] for r in live], [r["reply"] for r in live])
              if scorer is not None and live else [1.0] * len(live))
    by_prompt: dict[str, list[dict]] = {}
    for row, score in zip(live, scores):
        row["score"] = float(score)
        if row["score"] < cfg.threshold:
            row["dropped"] = "below_threshold_removed"
        else:
            by_prompt.setdefault(row["text"], []).append(row)
    for group in by_prompt.values():
        group.sort(key=lambda r: (-r["score"], r["sample"]))
        for row in group[cfg.keep_per_prompt:]:
            row["dropped"] = "beyond_keep_per_prompt_removed"
    for row in rows:
        if "dropped" in row:
            counts[row["dropped"]] += 1
    kept = [r for r in rows if "dropped" not in r]
    if len(kept) < cfg.min_rows:
        raise ValueError(f"synthesize: {len(kept)} rows kept, fewer than min_rows={cfg.min_rows} ({counts['generated']} "
                         f"generated; removed: " + ", ".join(f"{k.removesuffix('_removed')} {v}" for k, v in
                                                             counts.items() if k != "generated") + ")")
    (out / STATE).mkdir(parents=True, exist_ok=True)
    (out / STATE / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = _write_sft(out, kept, cfg.eval_fraction, seed)
    metrics = {f"synthesize/{k}": float(v) for k, v in counts.items()}
    metrics |= {"synthesize/prompts": float(len(prompts)), "synthesize/kept": float(len(kept)),
                "synthesize/kept_fraction": len(kept) / max(counts["generated"], 1),
                "synthesize/mean_score": sum(scores) / max(len(scores), 1),
                "sft/train_rows": float(splits["train"]), "sft/eval_rows": float(splits["eval"])}
    logger.info("[synthesize] kept %d of %d replies (%s)", len(kept), counts["generated"],
                ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if k != "generated" and v))
    return metrics


PROVENANCE = ("seed", "topic", "audience", "style", "template", "template_version", "teacher", "sample", "score")


def _write_sft(out: Path, kept: list[dict], eval_fraction: float, seed: int) -> dict[str, int]:
    """The kept rows as prepared sft data, split by prompt; provenance as a JSON column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.machinery.splits import schema

    prompts = sorted({r["text"] for r in kept})
    held = set(random.Random(f"{seed}-synthesize-split").sample(prompts, int(len(prompts) * eval_fraction)))
    target = schema("sft", tools=False).append(pa.field("provenance", pa.string()))
    folder = out / "sft"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, rows in (("train", [r for r in kept if r["text"] not in held]),
                        ("eval", [r for r in kept if r["text"] in held])):
        sizes[split] = len(rows)
        if rows:
            table = [{"prompt": [{"role": "user", "content": r["text"]}],
                      "completion": [{"role": "assistant", "content": r["reply"]}], "task": "synthetic",
                      "source": 0, "row": i, "provenance": json.dumps({k: r[k] for k in PROVENANCE})}
                     for i, r in enumerate(rows)]
            pq.write_table(pa.Table.from_pylist(table, schema=target), folder / f"{split}-00000.parquet")
    (out / "stats.json").write_text(json.dumps({"sft": {"train_rows": sizes["train"], "eval_rows": sizes["eval"]}},
                                               indent=2))
    return sizes


def _work(cfg: SynthesizeConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery import tracking
    from tasks.machinery.splits import load_split
    from tasks.blocks.judges import stage_judge

    tracking_uri = ctx.env.tracking_uri if ctx.env else None
    exclude = set()
    if "data" in inputs:
        held = load_split(inputs["data"], "eval", "test")
        exclude = {p[-1]["content"] for p in held["prompt"]} if held is not None else set()
    scorer = stage_judge(cfg.scorer, inputs, ctx, "scorer")
    teacher_ref = ctx.refs.get("teacher", {})
    name = (f"endpoint:{cfg.teacher.url}#{cfg.teacher.model}" if cfg.teacher.backend == "endpoint"
            else f"{teacher_ref.get('uri', inputs.get('teacher'))}@{teacher_ref.get('digest', '')[:12]}")
    try:
        metrics = synthesize(cfg, out, ctx.seed, inputs.get("teacher"), name, scorer, exclude, tracking_uri,
                             ctx.trust_remote_code)
    finally:
        if scorer is not None:
            scorer.close()
    if ctx.run_id:
        tracking.log_artifact(tracking_uri, ctx.run_id, out / STATE / "rows.jsonl", "synthesize")
        from tasks.machinery.splits import log_data_split

        log_data_split(ctx, out, "sft")
    return metrics


def source_inputs(cfg: SynthesizeConfig, tracking_uri: str | None = None) -> dict[str, dict]:
    """The registered templates (their versions key the stage), the topic/audience/style files and the scorer's
    prompt or rule."""
    from tasks.blocks.judges import judge_sources
    from tasks.machinery.store import digest_json

    refs = {}
    for i, template in enumerate(resolve_templates(cfg.templates, tracking_uri)):
        if template["version"].startswith("prompts:/"):
            refs[f"template.{i}"] = {"uri": template["version"], "kind": "source",
                                     "digest": digest_json({"template": template["text"]})}
    for what in ("topics", "audiences", "styles"):
        value = getattr(cfg, what)
        if isinstance(value, str):
            refs[f"{what}"] = {"uri": value, "kind": "source", "digest": digest_json({what: read_entries(value, what)})}
    if cfg.scorer is not None:
        refs |= judge_sources(cfg.scorer, ("score",), "scorer", tracking_uri)
    return refs


KIND = StageKind(
    name="synthesize",
    description="Synthetic SFT data: topics x audiences x styles x templates, answered by a teacher (a model, a "
    "policy of the pipeline or an endpoint), filtered (dedup, eval prompts, scorer threshold), with provenance.",
    config=SynthesizeConfig,
    input_problems=input_problems,
    inputs={
        "teacher": Slot("policy", "the model that writes the replies (teacher backend model)", required=False),
        "data": Slot("data", "prepared data whose eval prompts must not be synthesized (and so leak)", required=False,
                     data=("eval",)),
        **judge_slots("scorer"),
    },
    output="data",
    work=_work,
    headline=("synthesize/kept", "synthesize/kept_fraction", "synthesize/mean_score"),
    provides=lambda cfg: {"sft"},
)
