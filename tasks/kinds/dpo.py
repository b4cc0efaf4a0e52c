"""`dpo` stage: Direct Preference Optimization (TRL DPOTrainer) on preference pairs, the starting
policy as the frozen reference."""

from __future__ import annotations

from pathlib import Path

from tasks.blocks.align import DPOStageConfig, dpo_trainer, run_alignment, train_policy
from tasks.machinery.stagekind import Slot, StageKind

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
