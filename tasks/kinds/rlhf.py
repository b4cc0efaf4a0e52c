"""`rlhf` stage: online RL with TRL's GRPOTrainer. Completions sampled from the policy for the preference
prompts are scored by a reward model, rules and/or judges (tasks/blocks/online_rl.py); `beta` weights the KL penalty
to the starting policy."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.blocks.align import run_alignment, train_policy
from tasks.machinery.stagekind import StageKind
from tasks.blocks.online_rl import ONLINE_RL_INPUTS, OnlineRLSettings, input_problems, online_trainer, reward_sources
from tasks.machinery.training import stage_training

GRPOTraining = stage_training("GRPOTraining", "TRL GRPOConfig (lr 1e-6, batch 8 completions), one epoch",
                              learning_rate=1e-6, epochs=1.0)


class RLHFStageConfig(OnlineRLSettings):
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "none",
        description="GRPO advantage scaling. 'none' keeps the reward model's scale, so near-ties the reward "
        "model cannot tell apart are not blown up into large advantages (less reward hacking).",
    )
    training: GRPOTraining = Field(
        default_factory=GRPOTraining,
        description="Hyperparameters of the RL run; batch_size counts completions and must be a multiple of "
        "num_generations.",
    )


def _train(cfg: RLHFStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from trl import GRPOConfig, GRPOTrainer

    make_trainer = online_trainer(cfg, inputs, ctx, GRPOConfig, GRPOTrainer, scale_rewards=cfg.scale_rewards)
    return train_policy(cfg, inputs["data"], inputs["policy"], out, ctx, make_trainer)


def _work(cfg: RLHFStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return run_alignment(_train, cfg, inputs, out, ctx)


KIND = StageKind(
    name="rlhf",
    description="RLHF: GRPO (TRL GRPOTrainer) from a policy against a reward model, rules or judges, on the "
    "preference prompts.",
    config=RLHFStageConfig,
    input_problems=input_problems,
    inputs=ONLINE_RL_INPUTS,
    output="policy",
    work=_work,
    headline=("train/final_reward", "train/final_kl"),
    source_inputs=reward_sources,
)
