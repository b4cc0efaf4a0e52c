"""`evaluate` stage: base vs SFT vs aligned policy on held-out prompts.

Metrics per model (`base/`, `sft/`, `policy/`): task_accuracy (where a reference answer exists),
mean_reward (reward-model score), response_tokens. For the policy also: win_rate_vs_sft judged by the
reward model (ties count half) and kl_to_sft, a Monte-Carlo estimate of KL(policy || sft) from
completions sampled from the policy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import Field

from tasks.training import Section

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class EvaluateConfig(Section):
    max_new_tokens: int = Field(16, ge=1, description="Longest generated answer, in tokens.")
    max_prompts: int = Field(0, ge=0, description="Evaluate at most this many held-out prompts (0 = all).")
    kl_samples: int = Field(1, ge=0, description="Sampled completions per prompt for the KL estimate (0 = skip).")
    table_rows: int = Field(20, ge=0, description="Sample generations kept in the logged table.")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch.")


def answer_matches(response: str, reference: str) -> bool:
    """Exact match after trimming; for a numeric reference, the first number in the response."""
    clean = lambda s: s.strip().strip(".!").strip().lower()  # noqa: E731
    if clean(response) == clean(reference):
        return True
    if _NUMBER.fullmatch(reference.strip()):
        found = _NUMBER.search(response)
        return found is not None and float(found.group()) == float(reference)
    return False


def evaluate(cfg: EvaluateConfig, data: Path, models: dict[str, Path | str], reward: Path, out: Path,
             seed: int, trust_remote_code: bool = False) -> dict[str, float]:
    """Generate with each of `models` (base, sft, policy) on data/eval/test.jsonl and score them."""
    from tasks.data import load_split
    from tasks.generation import generate, reply_logprobs, reward_scores
    from tasks.modeling import load_causal_lm, load_reward_model, load_tokenizer
    from tasks.training import seed_everything

    seed_everything(seed)
    prompts_ds = load_split(data, "eval", "test")
    if prompts_ds is None:
        raise ValueError("evaluate: the prepared data has no eval prompts; set data.eval in the recipe")
    if cfg.max_prompts:
        prompts_ds = prompts_ds.select(range(min(cfg.max_prompts, len(prompts_ds))))
    prompts = list(prompts_ds["prompt"])
    references = list(prompts_ds["reference"])

    rm_tokenizer = load_tokenizer(reward, trust_remote_code)
    rm = load_reward_model(reward, trust_remote_code)
    answers, rewards, metrics = {}, {}, {}
    loaded = {}
    for name, source in models.items():
        tokenizer = load_tokenizer(source, trust_remote_code)
        model = load_causal_lm(source, trust_remote_code)
        loaded[name] = (model, tokenizer)
        answers[name] = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, seed=seed)
        rewards[name] = reward_scores(rm, rm_tokenizer, prompts, answers[name], cfg.batch_size)
        scored = [answer_matches(a, r) for a, r in zip(answers[name], references) if r is not None]
        if scored:
            metrics[f"{name}/task_accuracy"] = sum(scored) / len(scored)
        metrics[f"{name}/mean_reward"] = sum(rewards[name]) / len(prompts)
        lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[name]]
        metrics[f"{name}/response_tokens"] = sum(lengths) / len(lengths)

    if "policy" in models and "sft" in models:
        wins = [1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(rewards["policy"], rewards["sft"])]
        metrics["policy/win_rate_vs_sft"] = sum(wins) / len(wins)
        if cfg.kl_samples:
            (policy, tok), (sft, _) = loaded["policy"], loaded["sft"]
            many = [p for p in prompts for _ in range(cfg.kl_samples)]
            sampled = generate(policy, tok, many, cfg.max_new_tokens, cfg.batch_size, do_sample=True, seed=seed)
            lp_policy = reply_logprobs(policy, tok, many, sampled, cfg.batch_size)
            lp_sft = reply_logprobs(sft, tok, many, sampled, cfg.batch_size)
            metrics["policy/kl_to_sft"] = sum(a - b for a, b in zip(lp_policy, lp_sft)) / len(many)

    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt[-1]["content"], "reference": references[i]}
        for name in models:
            row[name] = answers[name][i]
            row[f"{name}_reward"] = round(rewards[name][i], 4)
        rows.append(row)
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def sample_table(out: Path, rows: int) -> list[dict]:
    """The first `rows` generations written by evaluate(), for MLflow and Prefect tables."""
    lines = (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:rows]]


def _work(config: dict, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks import tracking

    cfg = EvaluateConfig(**config)
    models = {name: inputs[name] for name in ("base", "sft", "policy") if name in inputs}
    metrics = evaluate(cfg, inputs["data"], models, inputs["reward"], out, ctx.seed, ctx.trust_remote_code)
    rows = sample_table(out, cfg.table_rows)
    tracking.log_table(ctx.env.tracking_uri, ctx.run_id, rows, "samples/generations.json")
    tracking.log_artifacts(ctx.env.tracking_uri, ctx.run_id, out, "evaluation")
    _publish_samples(rows)
    return metrics


def _publish_samples(rows: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key="posttrain-sample-generations", table=rows,
                          description="Sample generations on held-out prompts: base vs SFT vs aligned policy")


def _stage_task():
    from tasks.stage import stage_task

    return stage_task("evaluate", _work)


evaluate_task = _stage_task()
