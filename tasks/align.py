"""`align` stage: preference optimisation from the SFT model, KL-regularised to it.

* `dpo`  — TRL DPOTrainer on the preference pairs, the SFT model as the frozen reference.
* `rlhf` — online RL with TRL's GRPOTrainer: completions sampled from the policy for the preference
  prompts are scored by the trained reward model; `beta` weights the KL penalty to the SFT model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.training import Section, TrainingSettings


class RLHFSettings(Section):
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the GRPO group size).")
    max_completion_length: int = Field(8, ge=1, description="Longest sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for the rollouts.")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each batch of rollouts (GRPO's mu); "
                                "above 1, PPO-style clipping bounds each pass.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "none",
        description="GRPO advantage scaling. 'none' keeps the reward model's scale, so near-ties the reward "
        "model cannot tell apart are not blown up into large advantages (less reward hacking).",
    )
    training: TrainingSettings = Field(
        default_factory=lambda: TrainingSettings(learning_rate=2e-4, max_steps=150, batch_size=64),
        description="Hyperparameters of the RL run; batch_size counts completions and must be a multiple of "
        "num_generations.",
    )


class DPOSettings(Section):
    loss_type: list[str] = Field(
        default_factory=lambda: ["sigmoid", "sft"],
        description="TRL DPO loss types, combined; 'sft' adds the chosen replies' likelihood (RPO) and keeps "
        "the policy from drifting to degenerate replies.",
    )
    loss_weights: list[float] | None = Field(None, description="Weight of each loss type (default 1.0 each).")
    training: TrainingSettings = Field(
        default_factory=lambda: TrainingSettings(learning_rate=5e-4, epochs=2, batch_size=16),
        description="Hyperparameters of the DPO run.",
    )


class AlignConfig(Section):
    method: Literal["dpo", "rlhf"] = Field("dpo", description="dpo (offline, pairs) or rlhf (online RL vs the reward model).")
    beta: float = Field(0.1, gt=0, description="KL strength to the SFT model: DPO's beta, or GRPO's KL coefficient.")
    dpo: DPOSettings = Field(default_factory=DPOSettings, description="Settings used when method is dpo.")
    rlhf: RLHFSettings = Field(default_factory=RLHFSettings, description="Settings used when method is rlhf.")

    @model_validator(mode="after")
    def _group_divides_batch(self) -> "AlignConfig":
        t = self.rlhf.training
        if self.method == "rlhf" and (t.batch_size * t.gradient_accumulation_steps) % self.rlhf.num_generations:
            raise ValueError(
                f"align.rlhf.num_generations={self.rlhf.num_generations} must divide the effective batch "
                f"(align.rlhf.training.batch_size x gradient_accumulation_steps = "
                f"{t.batch_size * t.gradient_accumulation_steps})"
            )
        return self

    @property
    def training(self) -> TrainingSettings:
        return self.dpo.training if self.method == "dpo" else self.rlhf.training


def align(cfg: AlignConfig, data: Path, sft: Path, reward: Path | None, out: Path, seed: int, callbacks=(),
          trust_remote_code: bool = False, checkpoints=None) -> dict[str, float]:
    """Align the SFT model at `sft`; rlhf needs the reward model at `reward`. Saves the policy to `out`."""
    from tasks.data import load_split
    from tasks.modeling import load_causal_lm, load_tokenizer, save_model
    from tasks.training import final_train_metrics, train_with_checkpoints, peft_config, seed_everything, trainer_kwargs

    seed_everything(seed, cfg.training.deterministic_kernels)
    train = load_split(data, "preference", "train")
    if train is None:
        raise ValueError("align: the prepared data has no preference/train split; set data.preference")
    tokenizer = load_tokenizer(sft, trust_remote_code)
    policy = load_causal_lm(sft, trust_remote_code)
    common = dict(model=policy, processing_class=tokenizer, peft_config=peft_config(cfg.training.lora),
                  callbacks=list(callbacks))
    with tempfile.TemporaryDirectory() as scratch:
        base_args = trainer_kwargs(cfg.training, Path(scratch), seed)
        if cfg.method == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**base_args, beta=cfg.beta, max_length=cfg.training.max_length,
                             loss_type=cfg.dpo.loss_type, loss_weights=cfg.dpo.loss_weights)
            trainer = DPOTrainer(args=args, train_dataset=train, **common)
        else:
            from trl import GRPOConfig, GRPOTrainer

            if reward is None:
                raise ValueError("align.method=rlhf needs the reward stage's model")
            reward_model = _reward_model(reward, trust_remote_code)
            args = GRPOConfig(
                **base_args, beta=cfg.beta, num_generations=cfg.rlhf.num_generations,
                max_completion_length=cfg.rlhf.max_completion_length, temperature=cfg.rlhf.temperature,
                scale_rewards=cfg.rlhf.scale_rewards, num_iterations=cfg.rlhf.num_iterations,
            )
            prompts = train.select_columns(["prompt"])
            trainer = GRPOTrainer(
                args=args, train_dataset=prompts, reward_funcs=reward_model,
                reward_processing_classes=load_tokenizer(reward, trust_remote_code), **common,
            )
        resumed = train_with_checkpoints(trainer, checkpoints)
    save_model(trainer.model, tokenizer, out)
    return {**final_train_metrics(trainer), **resumed}


def _reward_model(path: Path, trust_remote_code: bool):
    from tasks.modeling import load_reward_model

    model = load_reward_model(path, trust_remote_code)
    model.requires_grad_(False)
    return model.eval()


def _train(config: dict, inputs: dict, out: Path, ctx) -> dict[str, float]:
    return align(AlignConfig(**config), inputs["data"], inputs["sft"], inputs.get("reward"), out, ctx.seed,
                 ctx.callbacks("align"), ctx.trust_remote_code, ctx.checkpoints(AlignConfig(**config).training))


def _work(config: dict, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks import tracking
    from tasks.launch import run_training
    from tasks.sft import log_training_split

    log_training_split(ctx, inputs["data"], "preference")
    metrics = run_training("tasks.align:_train", AlignConfig(**config).training, config, inputs, out, ctx)
    tracking.log_model_folder(ctx.env, ctx.run_id, out, "policy")
    return metrics


def _stage_task():
    from tasks.stage import stage_task

    return stage_task("align", _work)


align_task = _stage_task()
