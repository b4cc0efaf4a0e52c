"""What the alignment methods share: start from a policy, train it against itself as the KL reference,
save it, log it to MLflow. Each method is its own kind module (tasks/kinds/dpo.py, tasks/kinds/rlhf.py, ...)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from pydantic import Field

from tasks.machinery.training import Section, TrainingSettings, stage_training


class AlignmentSettings(Section):
    beta: float = Field(0.1, gt=0, description="KL strength to the starting policy (the frozen reference).")

    training: TrainingSettings


def train_policy(cfg: AlignmentSettings, data: Path, policy: Path | str, out: Path, ctx,
                 make_trainer: Callable[[dict, object, dict], object], data_kind: str = "preference",
                 prepare: Callable[[object, object, object], object] | None = None) -> dict[str, float]:
    """Load the policy at `policy` and the `data_kind` training split (through `prepare(split, model, tokenizer)`,
    when given: self-play and judged rounds generate their pairs there), build the method's trainer with
    `make_trainer(trainer_kwargs, train_split, common_kwargs)`, train (resuming from a stored checkpoint), save
    the policy to `out`."""
    from tasks.machinery.splits import load_split
    from tasks.machinery.modeling import load_causal_lm, load_tokenizer, save_model
    from tasks.machinery.training import final_train_metrics, peft_config, seed_everything, trainer_kwargs, train_with_checkpoints

    seed_everything(ctx.seed, cfg.training.deterministic_kernels)
    train = load_split(data, data_kind, "train")
    if train is None:
        raise ValueError(f"{ctx.stage}: the prepared data has no {data_kind}/train split")
    tokenizer = load_tokenizer(policy, ctx.trust_remote_code)
    model = load_causal_lm(policy, ctx.trust_remote_code, for_training=True)
    if prepare is not None:
        train = prepare(train, model, tokenizer)
    common = dict(model=model, processing_class=tokenizer, peft_config=peft_config(cfg.training.lora),
                  callbacks=ctx.callbacks())
    with tempfile.TemporaryDirectory() as scratch:
        trainer = make_trainer(trainer_kwargs(cfg.training, Path(scratch), ctx.seed), train, common)
        resumed = train_with_checkpoints(trainer, ctx.checkpoints(cfg.training))
    sizes = save_model(trainer.model, tokenizer, out, base=ctx.refs.get("policy") or policy)
    return {**final_train_metrics(trainer), **resumed, **sizes}


PAIRS_FILE = "pairs.jsonl"


def round_prompts(train, limit: int | None, seed: int, round_: int):
    """The rows a self-play or judged round samples from: all of them, or `limit` of them drawn per round (seeded)."""
    if limit is not None and limit < len(train):
        return train.shuffle(seed=seed * 1000 + round_).select(range(limit))
    return train


def keep_pairs(out: Path, records: list[dict]) -> None:
    """The pairs a stage made itself (self-play, judged samples), kept beside its policy and in its MLflow run."""
    import json

    from tasks.machinery.ranks import is_main_process

    if is_main_process():
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / PAIRS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def run_alignment(train_function, cfg: AlignmentSettings, inputs: dict, out: Path, ctx,
                  data_kind: str = "preference") -> dict[str, float]:
    """A method's stage work: log the split it trains on, train (in one or more processes), log the policy (and
    the pairs it made, if any)."""
    from tasks.machinery import tracking
    from tasks.machinery.launch import run_training
    from tasks.machinery.splits import log_data_split

    log_data_split(ctx, inputs["data"], data_kind)
    metrics = run_training(train_function, cfg.training, cfg, inputs, out, ctx)
    tracking.log_model_folder(ctx.env, ctx.run_id, out, "policy")
    if ctx.run_id and (out / PAIRS_FILE).exists():
        tracking.log_artifact(ctx.env.tracking_uri, ctx.run_id, out / PAIRS_FILE, "pairs")
    return metrics


# ---- DPO's settings and trainer, shared by the dpo, spin, online_dpo and elicit kinds -----------------------

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
