"""`evaluate` stage: every model input (base, sft, each branch, external models such as the registry's
`models:/<name>@champion`) on the held-out prompts.

Per model: task_accuracy (where a reference answer exists and no verifiers are set; per task too, with eval
prompts from several tasks), verifier/<name> (code that scores each reply), mean_reward (reward-model score,
when a reward model is an input), judge_score (a scoring judge), response_tokens, forgetting_nll (the anchor's
own replies to general prompts, per token; with its paired increase over the anchor), and, for every policy other than `base` and the reference (default: the input named `sft`),
win_rate_vs_<reference>, task_accuracy_delta_vs_<reference> and kl_to_<reference> (a Monte-Carlo estimate of
KL(policy || reference) from completions sampled from the policy). Every headline number carries a seeded
bootstrap confidence interval (`<metric>_ci_low`, `<metric>_ci_high`); differences are paired.
Per pair of models: the win rate judged by a pluggable judge (the reward model by default; ties count half),
the matrix in win_rates.json. Figures (tasks/machinery/figures.py) under figures/: comparison with error bars, the
win-rate matrix, reward distributions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tasks.blocks.harness import HarnessSettings
from tasks.blocks.judges import JudgeSettings, missing_judge_input
from tasks.machinery.stagekind import Slot, StageKind
from tasks.blocks.prompts import PROMPT_SLOT_HELP
from tasks.blocks.scoring import EVALUATION_METRICS, answer_matches, bootstrap_intervals
from tasks.machinery.training import Section



class EvaluationVerifier(Section):
    name: str = Field(description="The metric's name: <model>/verifier/<name>.")
    function: str = Field(description="`module:function` in TRL's reward-function form, f(prompts, completions, "
                          "reference=[...], **columns) -> list[float], scoring each reply (e.g. 1.0 correct, 0.0 not); "
                          "its module's source is in the cache key.")

    @field_validator("function")
    @classmethod
    def _module_and_name(cls, value: str) -> str:
        from tasks.blocks.judges import check_function_spec

        return check_function_spec(value)


class ForgettingSettings(Section):
    """Does post-training keep what the model could do? On general prompts, both ways: the anchor (the base, before
    post-training) answers greedily and every model's mean per-token negative log-likelihood of those replies is
    reported (<model>/forgetting_nll, with the paired increase over the anchor, <model>/forgetting_nll_increase);
    and every model answers greedily and the anchor scores those replies (<model>/forgetting_drift: the anchor's
    per-token NLL of the model's reply minus of its own). A policy that still answers as the base did stays near 0
    on both; one that answers everything in its trained format keeps a low nll_increase but drifts far."""

    prompts: str = Field(description="JSONL file (local or fsspec URI) of general prompts, one {\"prompt\": ...} per "
                         "line, unrelated to the trained skill; its digest is in the cache key.")
    anchor: str = Field("base", description="The input whose own greedy replies are the yardstick.")
    max_prompts: int = Field(0, ge=0, description="Use at most this many prompts (0 = all).")
    max_new_tokens: int = Field(96, ge=1, description="Longest anchor reply, in tokens.")


class EvaluateConfig(Section):
    max_new_tokens: int = Field(256, ge=1, description="Longest generated answer, in tokens.")
    max_prompts: int = Field(0, ge=0, description="Evaluate at most this many held-out prompts (0 = all).")
    kl_samples: int = Field(1, ge=0, description="Sampled completions per prompt for the KL estimate (0 = skip).")
    table_rows: int = Field(20, ge=0, description="Sample generations kept in the logged table.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")
    reference: str | None = Field(
        "sft", description="The input every other policy (except `base`) is compared against: win rate judged by "
        "the reward model and KL. Null, or no input of that name: no comparison.",
    )
    bootstrap_samples: int = Field(
        1000, ge=0, description="Bootstrap resamples of the prompts for the confidence intervals of every headline "
        "number (seeded; 0 = no intervals). Differences to the reference are paired: the same prompts resampled.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the bootstrap intervals.")
    judge: JudgeSettings | None = Field(
        None, description="Who judges the pairwise win rates (and, for a rule judge, scores each model: "
        "<model>/judge_score): a rule, a local model (the `judge` input) or an OpenAI-compatible endpoint, as in "
        "online_dpo. Default: the reward model's scores, when there is a `reward` input.")
    pairwise: bool = Field(True, description="Judge every pair of models (the win-rate matrix, win_rates.json and "
                           "its figure); false: only each compared policy against the reference.")
    figures: bool = Field(True, description="Draw the comparison, win-rate matrix and reward-distribution figures.")
    harness: HarnessSettings | None = Field(None, description="Also run lm-evaluation-harness tasks (Hub tasks, or "
                                            "custom local ones) on the models: <model>/harness/<task>/<metric>.")
    prompt: str | None = Field(None, description="A prompt template every model is asked through: a registered "
                               "prompt (prompts:/name/version, prompts:/name@alias, e.g. a prompt_search winner) or "
                               "an inline {{question}} template (tasks/blocks/prompts.py). Rewards and judges see the "
                               "plain question.")
    verifiers: list[EvaluationVerifier] = Field(
        default_factory=list, description="Code that checks each reply (a format, an answer): <model>/verifier/<name> "
        "with an interval per model, and the paired difference to the reference.")
    forgetting: ForgettingSettings | None = Field(
        None, description="A forgetting check on general prompts: the anchor's (base's) own replies' likelihood under "
        "each model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype for generation and scoring: 'auto' = bfloat16 on a GPU that supports "
        "it, float32 otherwise.",
    )



def input_problems(cfg: EvaluateConfig, inputs: dict[str, str]) -> list[str]:
    problem = missing_judge_input([cfg.judge], inputs) if cfg.judge is not None else None
    problems = [problem] if problem else []
    if cfg.forgetting is not None and cfg.forgetting.anchor not in inputs:
        problems.append(f"forgetting.anchor {cfg.forgetting.anchor!r} is not an input of this stage "
                        f"(inputs: {', '.join(sorted(inputs))})")
    return problems


def _anchor_replies(cfg: EvaluateConfig, models: dict, prompts_file: dict | None, trust_remote_code: bool,
                    seed: int) -> tuple[list, list[str]]:
    """The forgetting check's general prompts and the anchor model's own greedy replies to them."""
    if cfg.forgetting is None:
        return [], []
    from tasks.blocks.generation import generate
    from tasks.machinery.modeling import free, load_causal_lm, load_tokenizer

    general = read_prompts(prompts_file["uri"] if prompts_file else cfg.forgetting.prompts, cfg.forgetting.max_prompts)
    anchor = models[cfg.forgetting.anchor]
    tokenizer = load_tokenizer(anchor, trust_remote_code)
    model = load_causal_lm(anchor, trust_remote_code, cfg.dtype, on_device=True)
    replies = generate(model, tokenizer, general, cfg.forgetting.max_new_tokens, cfg.batch_size, seed=seed)
    free(model)
    return general, replies


def read_prompts(uri: str, limit: int = 0) -> list[list[dict]]:
    """A JSONL file of {"prompt": text} rows as chat prompts; errors name the file and line."""
    import fsspec

    prompts = []
    with fsspec.open(uri, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{uri}: line {number}: expected {{\"prompt\": \"...\"}}") from None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{uri}: line {number}: the prompt is empty or not a string")
            prompts.append([{"role": "user", "content": text}])
    if not prompts:
        raise ValueError(f"{uri}: no prompts")
    return prompts[:limit] if limit else prompts


def evaluate(cfg: EvaluateConfig, data: Path, models: dict[str, Path | str], reward: Path | str | None, out: Path,
             seed: int, trust_remote_code: bool = False, judge=None, template: list[dict] | None = None,
             forgetting_prompts: dict | None = None) -> dict[str, float]:
    """Generate with each of `models` on data/eval/test.jsonl and score them. One policy is on the device at
    a time (plus the reward model); each compared policy's samples are scored under the reference at the end.
    `judge` (tasks/judges.Judge) gives the pairwise verdicts of the win-rate matrix; default: the reward model.
    `template` (tasks/blocks/prompts.py) wraps each question the models are asked; rewards and judges see the question."""
    from tasks.blocks.prompts import wrap

    from tasks.machinery.splits import load_split
    from tasks.blocks.generation import generate, reply_logprobs, reward_scores
    from tasks.blocks.judges import load_function
    from tasks.machinery.modeling import free, load_causal_lm, load_reward_model, load_tokenizer
    from tasks.machinery.tracking import sanitize_metric_name
    from tasks.machinery.training import seed_everything

    seed_everything(seed)
    prompts_ds = load_split(data, "eval", "test", keep_tags=True)
    if prompts_ds is None:
        raise ValueError("evaluate: the prepared data has no eval prompts; set data.eval in the recipe")
    if cfg.max_prompts:
        prompts_ds = prompts_ds.select(range(min(cfg.max_prompts, len(prompts_ds))))
    prompts = list(prompts_ds["prompt"])
    references = list(prompts_ds["reference"])
    tasks = list(prompts_ds["task"])
    by_task = {t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))} if len(set(tasks)) > 1 else {}
    reference = cfg.reference if cfg.reference in models else None
    compared = [name for name in models if reference and name not in (reference, "base")]

    if reward is not None:
        rm_tokenizer = load_tokenizer(reward, trust_remote_code)
        rm = load_reward_model(reward, trust_remote_code, cfg.dtype, on_device=True)
    harness = None
    if cfg.harness is not None:
        from tasks.blocks.harness import Harness

        harness = Harness(cfg.harness, list(models), out, seed)
    answers, rewards, metrics, samples = {}, {}, {}, {}
    series: dict[str, list[float]] = {}  # per-prompt values of the headline numbers, for their intervals
    asked = [wrap(template, p) for p in prompts] if template else prompts
    many = [p for p in asked for _ in range(cfg.kl_samples)]
    verifiers = {v.name: load_function(v.function) for v in cfg.verifiers}
    general, anchor_replies = _anchor_replies(cfg, models, forgetting_prompts, trust_remote_code, seed)
    own_general: dict[str, list[str]] = {}  # each model's own replies to the general prompts
    # the verifiers judge replies by code: a reference-free set needs none, and no arithmetic match is guessed
    match_references = not verifiers
    for name, source in models.items():
        tokenizer = load_tokenizer(source, trust_remote_code)
        model = load_causal_lm(source, trust_remote_code, cfg.dtype, on_device=True)
        answers[name] = generate(model, tokenizer, asked, cfg.max_new_tokens, cfg.batch_size, seed=seed)
        correct = [None if r is None or not match_references else answer_matches(a, r)
                   for a, r in zip(answers[name], references)]
        for verifier, function in verifiers.items():
            scores = [float(v) for v in function(prompts, answers[name], reference=references, task=tasks)]
            if len(scores) != len(prompts):
                raise ValueError(f"evaluate.verifiers {verifier}: {len(scores)} scores for {len(prompts)} replies")
            series[f"{name}/verifier/{verifier}"] = scores
        if general:
            nll = reply_logprobs(model, tokenizer, general, anchor_replies, cfg.batch_size, per_token=True)
            series[f"{name}/forgetting_nll"] = [-v for v in nll]
            own_general[name] = anchor_replies if name == cfg.forgetting.anchor else generate(
                model, tokenizer, general, cfg.forgetting.max_new_tokens, cfg.batch_size, seed=seed)
        if reward is not None:
            rewards[name] = reward_scores(rm, rm_tokenizer, prompts, answers[name], cfg.batch_size)
        groups = [("", range(len(prompts)))] + [(f"/{sanitize_metric_name(t)}", rows) for t, rows in by_task.items()]
        for suffix, rows in groups:
            scored = [correct[i] for i in rows if correct[i] is not None]
            if scored:
                metrics[f"{name}/task_accuracy{suffix}"] = sum(scored) / len(scored)
            if reward is not None:
                metrics[f"{name}/mean_reward{suffix}"] = sum(rewards[name][i] for i in rows) / len(rows)
        if all(c is not None for c in correct):
            series[f"{name}/task_accuracy"] = [float(c) for c in correct]
        if reward is not None:
            series[f"{name}/mean_reward"] = list(rewards[name])
        series[f"{name}/response_tokens"] = [float(len(tokenizer(a, add_special_tokens=False)["input_ids"]))
                                             for a in answers[name]]
        if name in compared and cfg.kl_samples:
            sampled = generate(model, tokenizer, many, cfg.max_new_tokens, cfg.batch_size, do_sample=True, seed=seed)
            samples[name] = (sampled, reply_logprobs(model, tokenizer, many, sampled, cfg.batch_size))
        if harness is not None:
            metrics.update(harness.run(name, model, tokenizer))
        free(model)
    if reward is not None:
        free(rm)

    matrix = None
    scores = rewards if judge is None else judge.scores_of(prompts, answers)
    if judge is not None and scores is not None:
        for name, values in scores.items():
            series[f"{name}/judge_score"] = values
    pairs = [(a, b) for i, a in enumerate(models) for b in list(models)[i + 1:]] if cfg.pairwise else \
        [(name, reference) for name in compared]
    if pairs and (judge is not None or scores):
        judged = win_rates(prompts, answers, pairs, scores, judge)
        series.update(judged)
        if cfg.pairwise:
            matrix = {"models": list(models), "judge": judge.name if judge is not None else "reward model",
                      "prompts": len(prompts),
                      **{k: {a: {} for a in models} for k in ("win_rate", "ci_low", "ci_high")}}
            for key, verdicts in judged.items():
                a, _, b = key.partition("/win_rate_vs_")
                matrix["win_rate"][a][b] = sum(verdicts) / len(verdicts)
    for name in compared:
        for metric in ("task_accuracy", *(f"verifier/{v}" for v in verifiers)):
            if f"{name}/{metric}" in series and f"{reference}/{metric}" in series:
                series[f"{name}/{metric}_delta_vs_{reference}"] = [
                    a - b for a, b in zip(series[f"{name}/{metric}"], series[f"{reference}/{metric}"])]
    if general:
        anchor = cfg.forgetting.anchor
        for name in models:
            if name != anchor:
                series[f"{name}/forgetting_nll_increase"] = [
                    a - b for a, b in zip(series[f"{name}/forgetting_nll"], series[f"{anchor}/forgetting_nll"])]
        # the other direction: how unlike the anchor's are each model's own replies (the anchor's per-token NLL of
        # them, over its NLL of its own): a model that answers every question in a trained format drifts far
        tokenizer = load_tokenizer(models[anchor], trust_remote_code)
        anchor_model = load_causal_lm(models[anchor], trust_remote_code, cfg.dtype, on_device=True)
        under_anchor = {name: reply_logprobs(anchor_model, tokenizer, general, replies, cfg.batch_size, per_token=True)
                        for name, replies in own_general.items()}
        free(anchor_model)
        for name in models:
            if name != anchor:
                series[f"{name}/forgetting_drift"] = [a - b for a, b in zip(under_anchor[anchor], under_anchor[name])]
    if samples:
        tokenizer = load_tokenizer(models[reference], trust_remote_code)
        ref_model = load_causal_lm(models[reference], trust_remote_code, cfg.dtype, on_device=True)
        for name, (sampled, lp_policy) in samples.items():
            lp_ref = reply_logprobs(ref_model, tokenizer, many, sampled, cfg.batch_size)
            per_sample = [a - b for a, b in zip(lp_policy, lp_ref)]
            k = cfg.kl_samples
            series[f"{name}/kl_to_{reference}"] = [sum(per_sample[i * k:(i + 1) * k]) / k for i in range(len(prompts))]
        free(ref_model)

    versus_reference = {f"{name}/win_rate_vs_{reference}" for name in compared}
    shown = {key: values for key, values in series.items() if "/win_rate_vs_" not in key or key in versus_reference}
    for key, values in shown.items():
        if key.endswith("/task_accuracy") or key.endswith("/mean_reward"):
            continue  # already in metrics, with the per-task breakdown
        metrics[key] = sum(values) / len(values)
    # the forgetting check is resampled over its own (general) prompts, the rest over the evaluation prompts
    general_series = {key: values for key, values in shown.items() if "/forgetting_" in key}
    eval_series = {key: values for key, values in shown.items() if key not in general_series}
    for group in (eval_series, general_series):
        for key, (low, high) in bootstrap_intervals(group, cfg.bootstrap_samples, cfg.confidence, seed).items():
            metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = low, high
    if matrix is not None:
        every_pair = {key: values for key, values in series.items() if "/win_rate_vs_" in key}
        for key, (low, high) in bootstrap_intervals(every_pair, cfg.bootstrap_samples, cfg.confidence, seed).items():
            a, _, b = key.partition("/win_rate_vs_")
            matrix["ci_low"][a][b], matrix["ci_high"][a][b] = low, high
        (out / "win_rates.json").write_text(json.dumps(matrix, indent=2))

    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt[-1]["content"], "reference": references[i], "task": tasks[i]}
        for name in models:
            row[name] = answers[name][i]
            if reward is not None:
                row[f"{name}_reward"] = round(rewards[name][i], 4)
        rows.append(row)
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / EVALUATION_METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if cfg.figures:
        draw_figures(metrics, list(models), matrix, rewards, out, cfg.confidence)
    return metrics


def win_rates(prompts: list, answers: dict[str, list[str]], pairs: list[tuple[str, str]],
              scores: dict[str, list[float]] | None, judge=None) -> dict[str, list[float]]:
    """The per-prompt verdicts of each pair (a, b) both ways: `<a>/win_rate_vs_<b>` is 1 where a wins, 0 where b
    wins, 0.5 for a tie. From `scores` (each model's replies scored once: a reward model or a scoring judge),
    else by asking the pairwise `judge` once per pair (in both orders where it is set to)."""
    judged: dict[str, list[float]] = {}
    for a, b in pairs:
        if scores is not None:
            verdicts = [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(scores[a], scores[b])]
        else:
            verdicts = judge.prefer(prompts, answers[a], answers[b])
        judged[f"{a}/win_rate_vs_{b}"] = list(verdicts)
        judged[f"{b}/win_rate_vs_{a}"] = [1.0 - v for v in verdicts]
    return judged


def draw_figures(metrics: dict[str, float], models: list[str], matrix: dict | None, rewards: dict, out: Path,
                 confidence: float) -> None:
    from tasks.machinery import figures

    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    figures.comparison(metrics, models, folder, confidence)
    if matrix is not None:
        figures.win_rate_matrix(matrix, folder)
    figures.reward_distributions(rewards, folder)


def sample_table(out: Path, rows: int) -> list[dict]:
    """The first `rows` generations written by evaluate(), for MLflow and Prefect tables."""
    lines = (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:rows]]


def _work(cfg: EvaluateConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery import tracking
    from tasks.blocks.judges import stage_judge
    from tasks.blocks.prompts import template_of
    from tasks.machinery.splits import log_data_split

    # every input but the named slots (data, reward, judge) and source inputs (judge.prompt.*, harness.tasks)
    models = {name: source for name, source in inputs.items() if name not in KIND.inputs and "." not in name}
    judge = stage_judge(cfg.judge, inputs, ctx)
    try:
        metrics = evaluate(cfg, inputs["data"], models, inputs.get("reward"), out, ctx.seed, ctx.trust_remote_code,
                           judge, template_of(inputs), inputs.get(FORGETTING_INPUT))
    finally:
        if judge is not None:
            judge.close()
    log_data_split(ctx, inputs["data"], "eval", "test", "evaluation")
    rows = sample_table(out, cfg.table_rows)
    tracking.log_table(ctx.env.tracking_uri, ctx.run_id, rows, "samples/generations.json")
    tracking.log_artifacts(ctx.env.tracking_uri, ctx.run_id, out, "evaluation")
    _publish_samples(rows, list(models))
    return metrics


def evaluation_sources(cfg: EvaluateConfig, tracking_uri: str | None = None) -> dict[str, dict]:
    """The judge's prompt versions (or rule source), the custom harness tasks and the prompt template, as stage
    inputs."""
    from tasks.blocks.harness import harness_sources
    from tasks.blocks.judges import function_source
    from tasks.blocks.judges import judge_sources as sources
    from tasks.blocks.prompts import prompt_source

    judged = sources(cfg.judge, ("compare",), "judge", tracking_uri) if cfg.judge is not None else {}
    verifiers = {f"verifier.{v.name}": function_source(v.function) for v in cfg.verifiers}
    forgetting = {}
    if cfg.forgetting is not None:
        from tasks.machinery.fingerprints import _object_digest, file_digest

        uri = cfg.forgetting.prompts
        local = Path(uri.removeprefix("file://"))
        if "://" not in uri or uri.startswith("file://"):
            if not local.is_file():
                raise ValueError(f"forgetting.prompts: {uri}: file not found")
            uri, digest = str(local.resolve()), file_digest(local)
        else:
            digest = _object_digest(uri)
        forgetting = {FORGETTING_INPUT: {"uri": uri, "digest": digest, "kind": "source"}}
    return {**judged, **harness_sources(cfg.harness), **prompt_source(cfg.prompt, tracking_uri), **verifiers,
            **forgetting}


FORGETTING_INPUT = "forgetting.prompts"


def _publish_samples(rows: list[dict], models: list[str]) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key="posttrain-sample-generations", table=rows,
                          description=f"Sample generations on held-out prompts: {' vs '.join(models)}")


KIND = StageKind(
    name="evaluate",
    description="Generate with every policy input on the held-out prompts; task accuracy, reward-model score, "
    "win rate and KL against the reference input.",
    config=EvaluateConfig,
    input_problems=input_problems,
    inputs={
        "data": Slot("data", "prepared data with held-out eval prompts", data=("eval",)),
        "reward": Slot("reward", "the reward model that scores replies and judges win rates", required=False),
        "judge": Slot("policy", "the model an hf_model judge asks", required=False),
        "prompt": Slot("prompt", PROMPT_SLOT_HELP, required=False),
    },
    more_inputs=Slot("policy", "a policy to evaluate (any other input name: base, sft, policy, ...)"),
    output="report",
    work=_work,
    headline=("*/task_accuracy", "*/verifier/*", "*/win_rate_vs_*", "*/kl_to_*", "*/forgetting_nll_increase",
              "*/forgetting_drift"),
    source_inputs=evaluation_sources,
)
