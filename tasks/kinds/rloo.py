"""`rloo` stage: REINFORCE Leave-One-Out (TRL RLOOTrainer). Like GRPO it samples `num_generations` completions
per prompt and scores them (reward model, rules, judges: tasks/blocks/online_rl.py); each completion's baseline is
the mean reward of the other completions of its prompt, and the KL to the starting policy enters the reward."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tasks.blocks.align import run_alignment, train_policy
from tasks.machinery.stagekind import StageKind
from tasks.blocks.online_rl import ONLINE_RL_INPUTS, OnlineRLSettings, input_problems, online_trainer, reward_sources
from tasks.machinery.training import stage_training

RLOOTraining = stage_training("RLOOTraining", "TRL RLOOConfig (lr 1e-6, batch 8 completions), one epoch",
                              learning_rate=1e-6, epochs=1.0)


class RLOOStageConfig(OnlineRLSettings):
    beta: float = Field(0.05, gt=0, description="KL strength to the starting policy (TRL RLOOConfig's default).")
    normalize_advantages: bool = Field(False, description="Scale the leave-one-out advantages to unit variance.")
    training: RLOOTraining = Field(
        default_factory=RLOOTraining,
        description="Hyperparameters of the RL run; batch_size counts completions and must be a multiple of "
        "num_generations.",
    )


def _train(cfg: RLOOStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from trl import RLOOConfig, RLOOTrainer

    make_trainer = online_trainer(cfg, inputs, ctx, RLOOConfig, RLOOTrainer,
                                  normalize_advantages=cfg.normalize_advantages)
    return train_policy(cfg, inputs["data"], inputs["policy"], out, ctx, make_trainer)


def _work(cfg: RLOOStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return run_alignment(_train, cfg, inputs, out, ctx)


KIND = StageKind(
    name="rloo",
    description="RLOO (TRL RLOOTrainer) from a policy against a reward model, rules or judges, on the preference "
    "prompts.",
    config=RLOOStageConfig,
    input_problems=input_problems,
    inputs=ONLINE_RL_INPUTS,
    output="policy",
    work=_work,
    headline=("train/final_reward", "train/final_kl"),
    source_inputs=reward_sources,
)
