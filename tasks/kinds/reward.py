"""`reward` stage: a reward model trained with TRL's RewardTrainer on preference pairs."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import Field

from tasks.machinery.stagekind import Slot, StageKind
from tasks.machinery.training import Section, stage_training

RewardTraining = stage_training("RewardTraining", "lr 1e-5 for full fine-tuning of a reward model (TRL's "
                                "RewardConfig default of 1e-4 suits LoRA), one epoch", learning_rate=1e-5, epochs=1.0)


class RewardStageConfig(Section):
    training: RewardTraining = Field(default_factory=RewardTraining,
                                     description="Hyperparameters of the reward-model run.")
    center_rewards_coefficient: float | None = Field(
        0.01, description="Pull the mean reward towards 0 (TRL's center_rewards_coefficient); null to disable."
    )


def train_reward(cfg: RewardStageConfig, data: Path, init: Path, out: Path, seed: int, callbacks=(),
                 trust_remote_code: bool = False, checkpoints=None, init_ref: dict | None = None) -> dict[str, float]:
    """Train a sequence-classification reward model from `init` on data/preference; report held-out accuracy."""
    from trl import RewardConfig, RewardTrainer

    from tasks.machinery.splits import load_split
    from tasks.machinery.modeling import load_reward_model, load_tokenizer, save_model
    from tasks.machinery.training import final_train_metrics, train_with_checkpoints, peft_config, seed_everything, trainer_kwargs

    seed_everything(seed, cfg.training.deterministic_kernels)
    train, held_out = load_split(data, "preference", "train"), load_split(data, "preference", "eval")
    if train is None:
        raise ValueError("reward: the prepared data has no preference/train split; set data.preference")
    tokenizer = load_tokenizer(init, trust_remote_code)
    model = load_reward_model(init, trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as scratch:
        args = RewardConfig(
            **trainer_kwargs(cfg.training, Path(scratch), seed),
            max_length=cfg.training.max_length,
            center_rewards_coefficient=cfg.center_rewards_coefficient,
        )
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer,
            peft_config=peft_config(cfg.training.lora, task_type="SEQ_CLS"), callbacks=list(callbacks),
        )
        resumed = train_with_checkpoints(trainer, checkpoints)
        metrics = {**final_train_metrics(trainer), **resumed}
    if held_out is not None:
        metrics.update(pairwise_accuracy(trainer.model, tokenizer, held_out))
    metrics.update(save_model(trainer.model, tokenizer, out, base=init_ref or init))
    return metrics


def pairwise_accuracy(model, tokenizer, pairs) -> dict[str, float]:
    """Share of held-out pairs where the chosen reply outscores the rejected one, and the mean margin."""
    from tasks.blocks.generation import reward_scores

    prompts = list(pairs["prompt"])
    chosen = reward_scores(model, tokenizer, prompts, [c[-1]["content"] for c in pairs["chosen"]])
    rejected = reward_scores(model, tokenizer, prompts, [r[-1]["content"] for r in pairs["rejected"]])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
        "eval/margin": sum(margins) / len(margins),
        "eval/pairs": float(len(margins)),
    }


def _train(cfg: RewardStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return train_reward(cfg, inputs["data"], inputs["init"], out, ctx.seed, ctx.callbacks(), ctx.trust_remote_code,
                        ctx.checkpoints(cfg.training), ctx.refs.get("init"))


def _work(cfg: RewardStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery.launch import run_training
    from tasks.machinery.splits import log_data_split

    log_data_split(ctx, inputs["data"], "preference")
    return run_training(_train, cfg.training, cfg, inputs, out, ctx)


KIND = StageKind(
    name="reward",
    description="A reward model (TRL RewardTrainer) on the preference pairs; reports held-out pairwise accuracy.",
    config=RewardStageConfig,
    inputs={
        "data": Slot("data", "prepared data with preference pairs", data=("preference",)),
        "init": Slot("policy", "the language model the reward model starts from (its head is new)"),
    },
    output="reward",
    work=_work,
    headline=("pairwise_accuracy",),
)
