"""`prompt_search` stage: choose a system prompt / prompt template by measurement, with every candidate kept.

Candidates are listed in the recipe (a name, an optional system message, a `{{question}}` template; or a
registered prompt URI) and, optionally, written by a teacher from a meta-prompt (`generate`: the `teacher` input
or an OpenAI-compatible endpoint, as in synthesize). Each is asked the dev prompts (a held-out split of the
`data` input: by default sft/eval, not the evaluation set) through the `policy`, greedily, and scored: task
accuracy against the dev rows' references, or the mean score of a judge (a verifier rule, a reward model, a
model, an endpoint), with a seeded bootstrap interval.

Every text candidate becomes a version of one prompt in the MLflow prompt registry (`registry_name`, default
`<recipe>-<instance>`), tagged with its score and interval; the best one gets the alias (`best` by default), so
`prompts:/<name>@best` is the winner for `sft.prompt`, `evaluate.prompt` and judge prompts of later runs; in the
same run, an sft or evaluate stage takes the winner as its `prompt` input (the search stage's name). Any further
policy input (e.g. an `sft` stage with prompt_tuning: a soft prompt) is scored on the same dev prompts asked
plainly and shown in the same table; it cannot be registered as text, so the alias goes to the best text prompt.
Output: prompts.json (the table, best first) and winner.json.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.blocks.judges import JudgeSettings, judge_slots, missing_judge_input
from tasks.machinery.stagekind import Slot, StageKind
from tasks.blocks.teachers import TeacherSettings
from tasks.machinery.training import Section

logger = logging.getLogger("posttrain")
TABLE, WINNER = "prompts.json", "winner.json"


class Candidate(Section):
    name: str = Field(description="The candidate's name in the table and the registry tags.")
    system: str | None = Field(None, description="A system message (none: the question alone).")
    template: str = Field("{{question}}", description="The user message, with {{question}} where the question goes.")


class GenerateSettings(Section):
    count: int = Field(4, ge=1, description="Candidates the teacher writes.")
    meta_prompt: str = Field(
        "Write one short instruction (a system prompt) that makes an assistant answer questions correctly and "
        "concisely. Reply with the instruction only.", description="What the teacher is asked; each reply becomes "
        "the system message of a candidate (`generated-<i>`).")
    teacher: TeacherSettings = Field(default_factory=lambda: TeacherSettings(temperature=1.0, max_new_tokens=64),
                                     description="Who writes the candidates (the `teacher` input, or an endpoint).")


class PromptSearchConfig(Section):
    candidates: list[Candidate | str] = Field(default_factory=list, description="The candidates: {name, system, "
                                              "template}, or a registered prompt URI prompts:/name/version|@alias.")
    generate: GenerateSettings | None = Field(None, description="Also let a teacher write candidates from a "
                                              "meta-prompt.")
    dev_kind: Literal["sft", "preference", "eval"] = Field("sft", description="The data kind whose prompts are the "
                                                          "dev set; references: sft completion, preference chosen, "
                                                          "eval reference.")
    dev_split: str = Field("eval", description="Its split (sft/preference: eval = the held-out fraction; eval: test).")
    max_dev_prompts: int = Field(64, ge=1, description="Dev prompts scored per candidate (the first ones).")
    scorer: JudgeSettings | None = Field(None, description="Scores each reply (mean = the candidate's score); none: "
                                         "task accuracy against the dev references.")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated answer, in tokens.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    registry_name: str | None = Field(None, description="The prompt's name in the MLflow prompt registry (default: "
                                      "<recipe>-<instance>).")
    alias: str = Field("best", description="The alias the winner gets in the registry.")
    bootstrap_samples: int = Field(1000, ge=0, description="Bootstrap resamples for the scores' intervals.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the intervals.")

    @model_validator(mode="after")
    def _has_candidates(self) -> "PromptSearchConfig":
        if not self.candidates and self.generate is None:
            raise ValueError("prompt_search needs candidates, generate, or both")
        names = [c.name for c in self.candidates if isinstance(c, Candidate)]
        if len(names) != len(set(names)):
            raise ValueError(f"prompt_search candidates: names repeat ({', '.join(names)})")
        return self


def input_problems(cfg: PromptSearchConfig, inputs: dict[str, str]) -> list[str]:
    problems = []
    if cfg.generate and cfg.generate.teacher.backend == "model" and "teacher" not in inputs:
        problems.append("generate.teacher backend model reads the `teacher` input")
    problem = missing_judge_input([cfg.scorer], inputs) if cfg.scorer else None
    return problems + ([f"scorer: {problem}"] if problem else [])


def candidate_messages(candidates: list[Candidate | str], tracking_uri: str | None) -> list[dict]:
    """[{name, messages, source}] of the listed candidates (registered ones loaded)."""
    from tasks.blocks.prompts import as_messages, load

    out = []
    for c in candidates:
        if isinstance(c, str):
            uri, messages = load(c, tracking_uri)
            out.append({"name": uri.removeprefix("prompts:/"), "messages": messages, "source": uri})
        else:
            system = [{"role": "system", "content": c.system}] if c.system else []
            out.append({"name": c.name, "messages": as_messages(system + [{"role": "user", "content": c.template}]),
                        "source": "recipe"})
    return out


def generated_candidates(settings: GenerateSettings, teacher, seed: int, trust_remote_code: bool) -> list[dict]:
    from tasks.blocks.teachers import teach

    replies = teach(settings.teacher, teacher, [settings.meta_prompt], settings.count, seed, trust_remote_code)[0]
    found, seen = [], set()
    for i, text in enumerate(replies):
        text = re.sub(r"\s+", " ", text).strip()
        if text and text not in seen:
            seen.add(text)
            found.append({"name": f"generated-{i}", "source": "teacher",
                          "messages": [{"role": "system", "content": text}, {"role": "user", "content": "{{question}}"}]})
    logger.info("[prompt_search] the teacher wrote %d candidate(s) (%d of its %d replies were empty or repeated)",
                len(found), len(replies) - len(found), len(replies))
    return found


def dev_rows(cfg: PromptSearchConfig, data: Path) -> tuple[list, list[str]]:
    from tasks.machinery.splits import load_split

    rows = load_split(data, cfg.dev_kind, cfg.dev_split)
    if rows is None:
        raise ValueError(f"prompt_search: the data has no {cfg.dev_kind}/{cfg.dev_split} split for dev prompts "
                         "(set dev_kind / dev_split)")
    rows = rows.select(range(min(cfg.max_dev_prompts, len(rows))))
    column = {"sft": "completion", "preference": "chosen", "eval": "reference"}[cfg.dev_kind]
    refs = [r if isinstance(r, str) else r[-1]["content"] for r in rows[column]]
    return list(rows["prompt"]), refs


def search(cfg: PromptSearchConfig, data: Path, policy, out: Path, seed: int, tracking_uri: str | None,
           registry_name: str, soft_prompts: dict | None = None, teacher=None, scorer=None,
           trust_remote_code: bool = False) -> dict[str, float]:
    """Score every candidate on the dev prompts, register each as a prompt version, alias the best."""
    from tasks.blocks.scoring import answer_matches, bootstrap_intervals
    from tasks.blocks.generation import generate
    from tasks.machinery.modeling import free, load_causal_lm, load_tokenizer
    from tasks.blocks.prompts import wrap
    from tasks.machinery.tracking import sanitize_metric_name

    questions, references = dev_rows(cfg, data)
    candidates = candidate_messages(cfg.candidates, tracking_uri)
    if cfg.generate is not None:
        candidates += generated_candidates(cfg.generate, teacher, seed, trust_remote_code)

    def scores(model, tokenizer, asked: list) -> tuple[list[float], list[str]]:
        answers = generate(model, tokenizer, asked, cfg.max_new_tokens, cfg.batch_size, seed=seed)
        if scorer is not None:
            return [float(s) for s in scorer.score(questions, answers)], answers
        return [float(answer_matches(a, r)) for a, r in zip(answers, references)], answers

    series, rows = {}, []
    model, tokenizer = load_causal_lm(policy, trust_remote_code, on_device=True), load_tokenizer(policy, trust_remote_code)
    for c in candidates:
        series[c["name"]], answers = scores(model, tokenizer, [wrap(c["messages"], q) for q in questions])
        rows.append({"candidate": c["name"], "kind": "text", "source": c["source"], "messages": c["messages"],
                     "example": answers[0] if answers else ""})
        logger.info("[prompt_search] %s: %.3f", c["name"], sum(series[c["name"]]) / len(questions))
    free(model)
    for name, source in (soft_prompts or {}).items():
        soft = load_causal_lm(source, trust_remote_code, on_device=True)
        soft_tokenizer = load_tokenizer(source, trust_remote_code)
        series[name], answers = scores(soft, soft_tokenizer, questions)
        rows.append({"candidate": name, "kind": "soft_prompt", "source": f"input {name}", "messages": None,
                     "example": answers[0] if answers else ""})
        free(soft)
    intervals = bootstrap_intervals(series, cfg.bootstrap_samples, cfg.confidence, seed)
    for row in rows:
        values = series[row["candidate"]]
        row["score"] = sum(values) / len(values)
        row["ci_low"], row["ci_high"] = intervals.get(row["candidate"], (row["score"], row["score"]))
    text_rows = [r for r in rows if r["kind"] == "text"]
    scorer_name = "task_accuracy" if scorer is None else f"judge:{scorer.name}"
    for row in text_rows:
        row["version"] = register(tracking_uri, registry_name, row, scorer_name, len(questions))
    winner = max(text_rows, key=lambda r: r["score"])  # the first of equals: recipe order
    from tasks.machinery import tracking

    tracking.client(tracking_uri).set_prompt_alias(registry_name, cfg.alias, int(winner["version"]))
    rows.sort(key=lambda r: -r["score"])
    for row in rows:
        row["winner"] = row is winner
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE).write_text(json.dumps({"scorer": scorer_name, "dev_prompts": len(questions), "rows": rows}, indent=2))
    uri = f"prompts:/{registry_name}/{winner['version']}"
    (out / WINNER).write_text(json.dumps({"uri": uri, "alias": f"prompts:/{registry_name}@{cfg.alias}",
                                          "candidate": winner["candidate"], "score": winner["score"],
                                          "messages": winner["messages"]}, indent=2))
    logger.info("[prompt_search] winner %s (%s %.3f): %s@%s", winner["candidate"], scorer_name, winner["score"],
                f"prompts:/{registry_name}", cfg.alias)
    metrics = {"prompt_search/best_score": winner["score"], "prompt_search/candidates": float(len(text_rows))}
    for row in rows:
        key = f"prompt_search/{sanitize_metric_name(row['candidate'])}/score"
        metrics[key], metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = row["score"], row["ci_low"], row["ci_high"]
    return metrics


def register(tracking_uri: str | None, name: str, row: dict, scorer: str, dev_prompts: int) -> str:
    """The candidate as a version of the registry prompt (an existing identical version is reused), tagged with its
    score; returns the version."""
    from tasks.machinery import tracking

    client = tracking.client(tracking_uri)
    tags = {"posttrain.candidate": row["candidate"], "posttrain.score": f"{row['score']:.6g}",
            "posttrain.ci_low": f"{row['ci_low']:.6g}", "posttrain.ci_high": f"{row['ci_high']:.6g}",
            "posttrain.scorer": scorer, "posttrain.dev_prompts": str(dev_prompts), "posttrain.source": row["source"]}
    existing = None
    try:
        found = client.search_prompt_versions(name)
        existing = next((v for v in getattr(found, "prompt_versions", found) or []
                         if v.template == row["messages"]), None)
    except Exception:  # noqa: BLE001 - no such prompt yet
        existing = None
    if existing is None:
        version = client.register_prompt(name, row["messages"], commit_message=f"prompt_search candidate "
                                         f"{row['candidate']}: {scorer} {row['score']:.3f}", tags=tags)
        return str(version.version)
    for key, value in tags.items():
        client.set_prompt_version_tag(name, existing.version, key, value)
    return str(existing.version)


def _work(cfg: PromptSearchConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery import tracking
    from tasks.blocks.judges import stage_judge

    tracking_uri = ctx.env.tracking_uri if ctx.env else None
    name = cfg.registry_name or re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{(ctx.env.recipe if ctx.env else '') or 'posttrain'}-"
                                                                  f"{(ctx.stage or 'prompt_search').split('.round')[0]}")
    soft = {n: source for n, source in inputs.items() if n not in KIND.inputs and "." not in n}
    scorer = stage_judge(cfg.scorer, inputs, ctx, "scorer")
    try:
        metrics = search(cfg, inputs["data"], inputs["policy"], out, ctx.seed, tracking_uri, name, soft,
                         inputs.get("teacher"), scorer, ctx.trust_remote_code)
    finally:
        if scorer is not None:
            scorer.close()
    if ctx.run_id:
        table = json.loads((out / TABLE).read_text())["rows"]
        tracking.log_table(tracking_uri, ctx.run_id, [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                                       for k, v in r.items()} for r in table], "prompt_search/table.json")
        tracking.log_artifact(tracking_uri, ctx.run_id, out / WINNER, "prompt_search")
        tracking.set_tags(tracking_uri, ctx.run_id, {"posttrain.prompt": json.loads((out / WINNER).read_text())["alias"]})
    return metrics


def source_inputs(cfg: PromptSearchConfig, tracking_uri: str | None = None) -> dict[str, dict]:
    """Registered candidates (their versions key the stage) and the scorer's prompt or rule."""
    from tasks.blocks.judges import judge_sources
    from tasks.blocks.prompts import prompt_source

    refs = {}
    for i, c in enumerate(cfg.candidates):
        if isinstance(c, str):
            refs |= prompt_source(c, tracking_uri, f"candidate.{i}")
    if cfg.scorer is not None:
        refs |= judge_sources(cfg.scorer, ("score",), "scorer", tracking_uri)
    return refs


KIND = StageKind(
    name="prompt_search",
    description="Prompt search: candidate system prompts / templates (listed, or written by a teacher) scored on "
    "dev prompts; each a version in the MLflow prompt registry, the best aliased; soft prompts in the same table.",
    config=PromptSearchConfig,
    input_problems=input_problems,
    inputs={
        "data": Slot("data", "prepared data holding the dev prompts", data=lambda cfg: (cfg.dev_kind,)),
        "policy": Slot("policy", "the model the prompts are for"),
        "teacher": Slot("policy", "the model that writes candidates (generate)", required=False),
        **judge_slots("scorer"),
    },
    output="prompt",
    work=_work,
    headline=("prompt_search/best_score", "prompt_search/candidates"),
    more_inputs=Slot("policy", "a prompt-tuned model (sft with prompt_tuning) scored on the same dev prompts"),
    source_inputs=source_inputs,
)
