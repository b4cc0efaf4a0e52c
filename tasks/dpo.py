"""`dpo` stage: Direct Preference Optimization (TRL DPOTrainer) on preference pairs, the starting
policy as the frozen reference."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tasks.align import AlignmentSettings, run_alignment, train_policy
from tasks.kinds import Slot, StageKind
from tasks.training import stage_training

DPOTraining = stage_training("DPOTraining", "TRL DPOConfig (lr 1e-6, max_length 1024, batch 8), one epoch as in the "
                             "alignment-handbook DPO recipes", learning_rate=1e-6, epochs=1.0)


class DPOStageConfig(AlignmentSettings):
    loss_type: list[str] = Field(
        default_factory=lambda: ["sigmoid"],
        description="TRL DPO loss types, combined; adding 'sft' adds the chosen replies' likelihood (RPO) and keeps "
        "the policy from drifting to degenerate replies.",
    )
    loss_weights: list[float] | None = Field(None, description="Weight of each loss type (default 1.0 each).")
    training: DPOTraining = Field(default_factory=DPOTraining, description="Hyperparameters of the DPO run.")


def dpo_trainer(cfg: DPOStageConfig):
    """make_trainer for train_policy: TRL's DPOTrainer with the stage's loss (dpo, spin, online_dpo)."""
    def make_trainer(base_args: dict, train, common: dict):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**base_args, beta=cfg.beta, max_length=cfg.training.max_length,
                         loss_type=cfg.loss_type, loss_weights=cfg.loss_weights)
        return DPOTrainer(args=args, train_dataset=train, **common)

    return make_trainer


def _train(cfg: DPOStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return train_policy(cfg, inputs["data"], inputs["policy"], out, ctx, dpo_trainer(cfg))


def _work(cfg: DPOStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return run_alignment(_train, cfg, inputs, out, ctx)


KIND = StageKind(
    name="dpo",
    description="DPO (TRL DPOTrainer) from a policy on preference pairs.",
    config=DPOStageConfig,
    inputs={
        "data": Slot("data", "prepared data with preference pairs", data=("preference",)),
        "policy": Slot("policy", "the starting policy, also the frozen reference"),
    },
    output="policy",
    work=_work,
    headline=("train/final_loss",),
)
