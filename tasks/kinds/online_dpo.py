"""`online_dpo` stage: RLAIF by judged rounds (iterative / online DPO). Each round samples replies from the
current policy for the preference prompts, asks a judge (tasks/blocks/judges.py: the reward model, a rule, a local
model or an OpenAI-compatible endpoint) which is better, and trains DPO (TRL DPOTrainer) on the judged pairs with
the round's starting policy as reference. No human labels the pairs.

Rounds are instances of the recipe loop (`rounds: N`), each cached on its own; the judged pairs of a round are
kept beside its policy (pairs.jsonl) and in its MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.blocks.align import keep_pairs, round_prompts, run_alignment, train_policy
from tasks.blocks.align import DPOStageConfig, dpo_trainer
from tasks.blocks.judges import JudgeSettings, judge_slots, missing_judge_input
from tasks.machinery.stagekind import Slot, StageKind
from tasks.machinery.training import stage_training

OnlineDPOTraining = stage_training("OnlineDPOTraining", "TRL DPOConfig (lr 1e-6), batch 8, one epoch per round",
                                   learning_rate=1e-6, epochs=1.0)


class OnlineDPOStageConfig(DPOStageConfig):
    judge: JudgeSettings = Field(default_factory=lambda: JudgeSettings(backend="reward_model"),
                                 description="Who labels the sampled pairs (default: the `reward` input).")
    judge_mode: Literal["score", "compare"] = Field(
        "score", description="score: the judge scores every sample, chosen = best, rejected = worst; compare: the "
        "judge compares the two samples of a prompt (samples_per_prompt 2).")
    samples_per_prompt: int = Field(2, ge=2, description="Replies sampled per prompt.")
    max_completion_length: int = Field(256, ge=1, description="Longest sampled reply, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the replies.")
    prompts_per_round: int | None = Field(None, ge=1, description="Prompts per round (a seeded sample, different "
                                          "each round); all of them when unset.")
    margin: float = Field(0.0, ge=0, description="Keep a pair only when the judge's verdict is this decisive: "
                          "score difference > margin (score) or |preference - 0.5| > margin (compare); ties are "
                          "always dropped.")
    training: OnlineDPOTraining = Field(default_factory=OnlineDPOTraining,
                                        description="Hyperparameters of each round's DPO.")

    @model_validator(mode="after")
    def _compare_takes_two(self) -> "OnlineDPOStageConfig":
        if self.judge_mode == "compare" and self.samples_per_prompt != 2:
            raise ValueError("judge_mode compare judges two replies: set samples_per_prompt: 2")
        return self


def input_problems(cfg: OnlineDPOStageConfig, inputs: dict[str, str]) -> list[str]:
    problem = missing_judge_input([cfg.judge], inputs)
    return [problem] if problem else []


def judged_pairs(cfg: OnlineDPOStageConfig, train, model, tokenizer, judge, seed: int, round_: int):
    """(pairs, counts, records): sampled replies labelled by the judge."""
    from datasets import Dataset

    from tasks.blocks.generation import sample_replies

    train = round_prompts(train, cfg.prompts_per_round, seed, round_)
    prompts = list(train["prompt"])
    samples = sample_replies(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.max_completion_length,
                             cfg.temperature, seed * 1000 + round_)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    records = []
    if cfg.judge_mode == "compare":
        verdicts = judge.prefer(prompts, [s[0] for s in samples], [s[1] for s in samples])
        for prompt, (a, b), v in zip(prompts, samples, verdicts):
            keep = abs(v - 0.5) > max(cfg.margin, 1e-9)
            best, worst = (a, b) if v > 0.5 else (b, a)
            records.append({"prompt": prompt[-1]["content"], "replies": [a, b], "preference_first": v, "kept": keep})
            if keep:
                _add(rows, prompt, best, worst)
    else:
        flat = judge.score([p for p, s in zip(prompts, samples) for _ in s], [r for s in samples for r in s])
        n = cfg.samples_per_prompt
        for i, (prompt, replies) in enumerate(zip(prompts, samples)):
            scores = flat[i * n : (i + 1) * n]
            hi, lo = max(range(n), key=scores.__getitem__), min(range(n), key=scores.__getitem__)
            keep = scores[hi] - scores[lo] > cfg.margin and replies[hi] != replies[lo]
            records.append({"prompt": prompt[-1]["content"], "replies": replies, "scores": scores, "kept": keep})
            if keep:
                _add(rows, prompt, replies[hi], replies[lo])
    kept = len(rows["prompt"])
    counts = {"judge/prompts": float(len(prompts)), "judge/pairs": float(kept),
              "judge/undecided": float(len(prompts) - kept), "judge/decided_fraction": kept / max(len(prompts), 1)}
    if not kept:
        raise ValueError(f"online_dpo round {round_}: the judge found no pair with a winner among {len(prompts)} "
                         "prompts (more samples_per_prompt, a higher temperature, or a lower margin)")
    return Dataset.from_dict(rows), counts, records


def _add(rows: dict, prompt, chosen: str, rejected: str) -> None:
    rows["prompt"].append(prompt)
    rows["chosen"].append([{"role": "assistant", "content": chosen}])
    rows["rejected"].append([{"role": "assistant", "content": rejected}])


def _train(cfg: OnlineDPOStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.blocks.judges import stage_judge

    counts: dict[str, float] = {}

    def prepare(train, model, tokenizer):
        judge = stage_judge(cfg.judge, inputs, ctx)
        pairs, made, records = judged_pairs(cfg, train, model, tokenizer, judge, ctx.seed, ctx.round)
        counts.update(made)
        keep_pairs(out, records)
        judge.close()
        return pairs

    metrics = train_policy(cfg, inputs["data"], inputs["policy"], out, ctx, dpo_trainer(cfg), "preference", prepare)
    return {**metrics, **counts}


def _work(cfg: OnlineDPOStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return run_alignment(_train, cfg, inputs, out, ctx)


def judge_sources(cfg: OnlineDPOStageConfig, tracking_uri: str | None = None) -> dict[str, dict]:
    from tasks.blocks.judges import judge_sources as sources

    return sources(cfg.judge, (cfg.judge_mode,), "judge", tracking_uri)


KIND = StageKind(
    name="online_dpo",
    description="RLAIF: rounds of sample -> judge -> DPO (a reward model, rule, local model or OpenAI-compatible "
    "endpoint labels the policy's own replies).",
    config=OnlineDPOStageConfig,
    input_problems=input_problems,
    inputs={
        "data": Slot("data", "prepared data whose preference prompts are sampled", data=("preference",)),
        "policy": Slot("policy", "the policy the round starts from, also its reference"),
        **judge_slots(),
    },
    output="policy",
    work=_work,
    headline=("judge/decided_fraction", "train/final_loss"),
    source_inputs=judge_sources,
)
