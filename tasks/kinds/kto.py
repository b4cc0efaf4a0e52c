"""`kto` stage: Kahneman-Tversky Optimization (TRL KTOTrainer) on unpaired feedback — a prompt, a completion
and a thumbs-up or thumbs-down — with the starting policy as the frozen reference.

KTOTrainer reads its data in order (its KL estimate pairs each row with its batch neighbours), so rows must
arrive with both labels mixed: the stage shuffles them itself (seeded). Given preference pairs instead
(`data_kind: preference`), it unpairs them itself — chosen as desirable, rejected as undesirable — and
shuffles, rather than letting the trainer write all chosen rows and then all rejected ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.blocks.align import AlignmentSettings, run_alignment, train_policy
from tasks.machinery.stagekind import Slot, StageKind
from tasks.machinery.training import stage_training

KTOTraining = stage_training("KTOTraining", "TRL KTOConfig (lr 1e-6; its docs advise 5e-7 to 5e-6), batch 8, one "
                             "epoch", learning_rate=1e-6, epochs=1.0)


class KTOStageConfig(AlignmentSettings):
    data_kind: Literal["unpaired", "preference"] = Field(
        "unpaired", description="Train on the prepared unpaired feedback, or on preference pairs unpaired here "
        "(chosen = desirable, rejected = undesirable).")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable (label true) rows' loss.")
    undesirable_weight: float = Field(
        1.0, gt=0, description="Weight of the undesirable rows' loss; KTO's authors advise weights that make "
        "desirable_weight x desirable rows / (undesirable_weight x undesirable rows) lie in [1, 4/3].")
    training: KTOTraining = Field(default_factory=KTOTraining, description="Hyperparameters of the KTO run.")

    @model_validator(mode="after")
    def _batches_mix_rows(self) -> "KTOStageConfig":
        if self.training.batch_size < 2:
            raise ValueError("training.batch_size must be at least 2: KTO estimates its KL term from the other rows "
                             "of a batch (its docs advise 4 or more per device)")
        return self


def unpaired_rows(train, data_kind: str, seed: int):
    """The rows KTO trains on, shuffled (seeded) so that every batch mixes desirable and undesirable ones."""
    if data_kind == "preference":
        def unpair(batch):
            n = len(batch["prompt"])
            return {"prompt": batch["prompt"] * 2, "completion": batch["chosen"] + batch["rejected"],
                    "label": [True] * n + [False] * n}

        train = train.map(unpair, batched=True, remove_columns=train.column_names)
    return train.shuffle(seed=seed).flatten_indices()


def label_counts(train) -> dict[str, float]:
    labels = train["label"]
    return {"data/desirable_rows": float(sum(labels)), "data/undesirable_rows": float(len(labels) - sum(labels))}


def _train(cfg: KTOStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    counts: dict[str, float] = {}

    def prepare(train, model, tokenizer):
        rows = unpaired_rows(train, cfg.data_kind, ctx.seed)
        counts.update(label_counts(rows))
        return rows

    def make_trainer(base_args: dict, train, common: dict):
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**base_args, beta=cfg.beta, max_length=cfg.training.max_length,
                         desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        return KTOTrainer(args=args, train_dataset=train, **common)

    metrics = train_policy(cfg, inputs["data"], inputs["policy"], out, ctx, make_trainer, cfg.data_kind, prepare)
    return {**metrics, **counts}


def _work(cfg: KTOStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return run_alignment(_train, cfg, inputs, out, ctx, cfg.data_kind)


KIND = StageKind(
    name="kto",
    description="KTO (TRL KTOTrainer) from a policy on unpaired thumbs-up/down feedback (or unpaired preference "
    "pairs).",
    config=KTOStageConfig,
    inputs={
        "data": Slot("data", "prepared data with unpaired feedback (or preference pairs: data_kind)",
                     data=lambda cfg: (cfg.data_kind,)),
        "policy": Slot("policy", "the starting policy, also the frozen reference"),
    },
    output="policy",
    work=_work,
    headline=("train/final_loss",),
)
