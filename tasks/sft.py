"""`sft` stage: supervised fine-tuning with TRL's SFTTrainer, full or LoRA, chat template applied."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import Field

from tasks.kinds import Slot, StageKind
from tasks.training import Section, TrainingSettings


class SFTStageConfig(Section):
    training: TrainingSettings = Field(
        default_factory=lambda: TrainingSettings(learning_rate=2e-3, epochs=6, batch_size=16),
        description="Hyperparameters of the fine-tuning run.",
    )
    completion_only_loss: bool = Field(True, description="Train on the completion tokens only, not the prompt.")


def train_sft(cfg: SFTStageConfig, data: Path, base: Path, out: Path, seed: int, callbacks=(),
              trust_remote_code: bool = False, checkpoints=None) -> dict[str, float]:
    """Fine-tune the model at `base` on data/sft/train.jsonl; save the (merged) model to `out`."""
    from trl import SFTConfig, SFTTrainer

    from tasks.data import load_split
    from tasks.modeling import load_causal_lm, load_tokenizer, save_model
    from tasks.training import final_train_metrics, train_with_checkpoints, peft_config, seed_everything, trainer_kwargs

    seed_everything(seed, cfg.training.deterministic_kernels)
    train, held_out = load_split(data, "sft", "train"), load_split(data, "sft", "eval")
    if train is None:
        raise ValueError("sft: the prepared data has no sft/train split; set data.sft in the recipe")
    tokenizer = load_tokenizer(base, trust_remote_code)
    model = load_causal_lm(base, trust_remote_code)
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            **trainer_kwargs(cfg.training, Path(scratch), seed),
            max_length=cfg.training.max_length,
            completion_only_loss=cfg.completion_only_loss,
            packing=False,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer,
            peft_config=peft_config(cfg.training.lora), callbacks=list(callbacks),
        )
        resumed = train_with_checkpoints(trainer, checkpoints)
        metrics = {**final_train_metrics(trainer), **resumed}
        if held_out is not None:
            metrics["eval/loss"] = float(trainer.evaluate(held_out)["eval_loss"])
    save_model(trainer.model, tokenizer, out)
    return metrics


def _train(cfg: SFTStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return train_sft(cfg, inputs["data"], inputs["base"], out, ctx.seed, ctx.callbacks(), ctx.trust_remote_code,
                     ctx.checkpoints(cfg.training))


def _work(cfg: SFTStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.launch import run_training

    log_training_split(ctx, inputs["data"], "sft")
    return run_training(_train, cfg.training, cfg, inputs, out, ctx)


def log_training_split(ctx, data: Path, kind: str) -> None:
    """Record the split a stage trains on as an MLflow dataset input of the stage's run."""
    import json

    from tasks import tracking
    from tasks.data import split_files

    rows = json.loads((data / "stats.json").read_text())[kind]["train_rows"]
    tracking.log_dataset(ctx.env.tracking_uri, ctx.run_id, split_files(data, kind, "train"), f"{kind}-train", rows,
                         "training")


KIND = StageKind(
    name="sft",
    description="Supervised fine-tuning (TRL SFTTrainer), full or LoRA, on the sft demonstrations.",
    config=SFTStageConfig,
    inputs={
        "data": Slot("data", "prepared data with sft demonstrations", data=("sft",)),
        "base": Slot("policy", "the model to fine-tune"),
    },
    output="policy",
    work=_work,
    headline=("train/final_loss", "eval/loss"),
)
