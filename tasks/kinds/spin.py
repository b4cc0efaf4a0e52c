"""`spin` stage: Self-Play fIne-tuNing (Chen et al., 2024). No maintained trainer exists; one SPIN round is
DPO's loss (TRL DPOTrainer) on pairs the stage makes itself: for each SFT prompt, chosen = the human
demonstration, rejected = the current model's own reply, and the reference = the model the round starts from.

Rounds are instances of the recipe loop (`rounds: N`): round t starts from round t-1's policy, which is also its
reference, and each round is cached on its own. A LoRA round's adapter is merged when the next round loads it,
so the reference is the previous round, not the original base. The round stops teaching once the model's
replies match the demonstrations: those pairs are dropped (identical pairs teach nothing) and counted.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tasks.blocks.align import keep_pairs, round_prompts, run_alignment, train_policy
from tasks.blocks.align import DPOStageConfig, dpo_trainer
from tasks.machinery.stagekind import Slot, StageKind
from tasks.machinery.training import stage_training

SPINTraining = stage_training("SPINTraining", "the SPIN paper's DPO settings (lr 5e-7 for 7B models), batch 8, "
                              "one epoch per round", learning_rate=5e-7, epochs=1.0)


class SPINStageConfig(DPOStageConfig):
    max_completion_length: int = Field(256, ge=1, description="Longest generated reply (the rejected side), in tokens.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the model's own replies; 0 = greedy "
                               "(the model's most likely reply, the one the round should push away from).")
    prompts_per_round: int | None = Field(None, ge=1, description="Use this many SFT prompts per round (a seeded "
                                          "sample, different each round); all of them when unset.")
    training: SPINTraining = Field(default_factory=SPINTraining, description="Hyperparameters of each round's DPO.")


def self_play_pairs(cfg: SPINStageConfig, train, model, tokenizer, seed: int, round_: int):
    """(pairs, counts, records): the demonstrations as chosen, the model's own replies as rejected."""
    from datasets import Dataset

    from tasks.blocks.generation import sample_replies

    train = round_prompts(train, cfg.prompts_per_round, seed, round_)
    prompts = list(train["prompt"])
    demonstrations = list(train["completion"])
    replies = sample_replies(model, tokenizer, prompts, 1, cfg.max_completion_length, cfg.temperature,
                             seed * 1000 + round_)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    records = []
    for prompt, demo, (reply,) in zip(prompts, demonstrations, replies):
        same = reply.strip() == demo[-1]["content"].strip()
        records.append({"prompt": prompt[-1]["content"], "demonstration": demo[-1]["content"], "reply": reply,
                        "kept": not same})
        if same:
            continue
        rows["prompt"].append(prompt)
        rows["chosen"].append(demo)
        rows["rejected"].append([{"role": "assistant", "content": reply}])
    matched = len(prompts) - len(rows["prompt"])
    counts = {"spin/prompts": float(len(prompts)), "spin/pairs": float(len(rows["prompt"])),
              "spin/matched_demonstration": float(matched),
              "spin/matched_fraction": matched / max(len(prompts), 1)}
    if not rows["prompt"]:
        raise ValueError(f"spin round {round_}: the model's replies match every demonstration; nothing is left to "
                         "learn (stop the rounds here)")
    return Dataset.from_dict(rows), counts, records


def _train(cfg: SPINStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    counts: dict[str, float] = {}

    def prepare(train, model, tokenizer):
        pairs, made, records = self_play_pairs(cfg, train, model, tokenizer, ctx.seed, ctx.round)
        counts.update(made)
        keep_pairs(out, records)
        return pairs

    metrics = train_policy(cfg, inputs["data"], inputs["policy"], out, ctx, dpo_trainer(cfg), "sft", prepare)
    return {**metrics, **counts}


def _work(cfg: SPINStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return run_alignment(_train, cfg, inputs, out, ctx, "sft")


KIND = StageKind(
    name="spin",
    description="SPIN self-play rounds: DPO with the SFT demonstrations as chosen and the policy's own replies as "
    "rejected, the previous round as reference.",
    config=SPINStageConfig,
    inputs={
        "data": Slot("data", "prepared data with sft demonstrations", data=("sft",)),
        "policy": Slot("policy", "the policy the round starts from (round 1: the SFT model), also its reference"),
    },
    output="policy",
    work=_work,
    headline=("spin/matched_fraction", "train/final_loss"),
)
