"""What the training stages share: typed hyperparameters, TRL arguments for CPU or GPU, seeds, curves."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("posttrain")


class Section(BaseModel):
    """Base of every config section: unknown keys are refused and values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(Section):
    enabled: bool = Field(False, description="Train a LoRA adapter (PEFT) instead of all weights. The stage stores the "
                          "adapter (a small output); a consumer gets it merged into its base.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full beside the adapter and stored with it, e.g. "
        "[embed_tokens] when the chat template's tokens are new or untrained in the base model (LoRA alone cannot "
        "move a frozen embedding); a tied output layer stays tied.")
    variant: Literal["lora", "dora", "rslora", "pissa"] = Field(
        "lora", description="PEFT's LoRA variants: dora (weight-decomposed, use_dora), rslora (rank-stabilised "
        "scaling alpha/sqrt(r)), pissa (initialised from the weights' principal singular vectors).")


class TrainingSettings(Section):
    """Hyperparameters every training stage shares. The defaults are for real models (TRL's config defaults,
    one epoch); each stage kind states its own (`stage_training`); the demo's toy values live in its recipes."""

    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 runs `epochs` epochs.")
    batch_size: int = Field(8, ge=1, description="Per-device training batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name (linear, cosine, constant, ...).")
    max_length: int = Field(1024, ge=8, description="Longest tokenized example; longer ones are truncated.")
    logging_steps: int = Field(5, ge=1, description="Log the training curve to MLflow every N steps.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (useful for big models on GPU).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto' = bf16 on a GPU that supports it, fp32 on CPU."
    )
    deterministic_kernels: bool = Field(
        False, description="Force deterministic torch kernels (for bit-exact GPU reruns; CPU runs are exact anyway)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Parameter-efficient fine-tuning.")
    checkpoint_steps: int = Field(
        0, ge=0, description="Save a resumable checkpoint to the artifact store every N optimizer steps (0 = never); "
        "a killed stage resumes from the newest one."
    )
    processes: int = Field(1, ge=1, description="Training processes on this machine (DDP): gloo on CPU, NCCL on GPUs.")
    launcher: Literal["torchrun", "accelerate"] = Field(
        "torchrun", description="How processes > 1 are started: torchrun, or accelerate launch (for DeepSpeed/FSDP)."
    )
    accelerate_config: str | None = Field(
        None, description="accelerate config file (DeepSpeed / FSDP) used with launcher=accelerate."
    )


def stage_training(name: str, why: str, **defaults) -> type[TrainingSettings]:
    """TrainingSettings with one stage kind's defaults (`why`: where they come from). A recipe that sets only
    some fields (`training: {epochs: 2}`) keeps the kind's defaults for the rest."""
    from pydantic import create_model
    from pydantic.fields import FieldInfo

    fields = {key: (TrainingSettings.model_fields[key].annotation,
                    FieldInfo.merge_field_infos(TrainingSettings.model_fields[key], default=value))
              for key, value in defaults.items()}
    return create_model(name, __base__=TrainingSettings, __doc__=f"Training settings; defaults: {why}.", **fields)


def seed_everything(seed: int, deterministic_kernels: bool = False) -> None:
    """Seed Python, NumPy and torch. CPU training is already bit-reproducible; `deterministic_kernels`
    also forces deterministic GPU kernels (slower, and 2.5x slower on CPU for no gain, so off by default)."""
    from transformers import enable_full_determinism, set_seed

    if deterministic_kernels:
        enable_full_determinism(seed, warn_only=True)
    else:
        set_seed(seed)


def trainer_kwargs(t: TrainingSettings, scratch: Path, seed: int) -> dict:
    """Keyword arguments every TRL *Config takes, with the CPU pitfalls handled (API-NOTES)."""
    import torch

    cuda = torch.cuda.is_available()
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    from transformers import TrainingArguments

    from tasks.machinery.ranks import TRAINER_OUTPUT_ENV

    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (TRL still sets the old one).
    checkpointing = ({"activation_checkpointing": t.gradient_checkpointing}
                     if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else {})
    return dict(
        **checkpointing,
        output_dir=os.environ.get(TRAINER_OUTPUT_ENV) or str(scratch),
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=max(t.batch_size, 16),
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        logging_steps=t.logging_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        use_cpu=not cuda,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=seed,
        data_seed=seed,
        report_to="none",
        save_strategy="steps" if t.checkpoint_steps else "no",
        save_steps=t.checkpoint_steps or 500,
        save_total_limit=1,
        eval_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=not _show_progress(),
    )


def _show_progress() -> bool:
    return os.environ.get("POSTTRAIN_PROGRESS", "1") != "0"


def peft_config(lora: LoraSettings, task_type: str = "CAUSAL_LM"):
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type=task_type, modules_to_save=(["score"] if task_type == "SEQ_CLS" else []) + lora.modules_to_save or None,
        ensure_weight_tying=bool(lora.modules_to_save),
        use_dora=lora.variant == "dora", use_rslora=lora.variant == "rslora",
        init_lora_weights="pissa" if lora.variant == "pissa" else True,
    )


def curve_name(key: str) -> str:
    """A transformers/TRL log key as the stage run's curve: train/<key> (loss -> train/loss; the closing
    train_loss, a mean over the run, -> train/mean_loss), eval/<key> for eval_<key>, so a stage logs each
    quantity under one name (no eval_loss beside eval/loss)."""
    if key == "train_loss":  # the trainer's closing line: the mean loss over the run, not a step's
        return "train/mean_loss"
    for prefix in ("train", "eval"):
        if key.startswith(f"{prefix}_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return key if key.startswith(("train/", "eval/")) else f"train/{key}"


def metrics_callback(log: Callable[[dict[str, float], int], None], stage: str):
    """A transformers callback that sends each logged step to `log(metrics, step)` and prints progress."""
    from transformers import TrainerCallback

    from tasks.machinery.logs import PrefectProgress

    class _StepLogger(TrainerCallback):
        replaces_library_printing = True  # see train_with_checkpoints

        def __init__(self):
            self.started = time.monotonic()
            self.progress = PrefectProgress(stage)
            self.last = None  # (time, step, tokens) of the previous logged step

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()
            self.first_step = state.global_step  # a resumed run counts from where it resumed

        def on_log(self, args, state, control, logs=None, **kwargs):
            numbers = {curve_name(k): float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if not numbers:
                return
            now, step = time.monotonic(), state.global_step
            speed = ""
            tokens = numbers.get("train/num_tokens")
            if tokens is not None and self.last is not None and now > self.last[0] and tokens > self.last[2]:
                numbers["train/tokens_per_second"] = (tokens - self.last[2]) / (now - self.last[0])
                speed = f" | {numbers['train/tokens_per_second']:,.0f} tok/s"
            if tokens is not None:
                self.last = (now, step, tokens)
            done = step - getattr(self, "first_step", 0)
            if done > 0 and state.max_steps > step:
                speed += f", ETA {_duration((now - self.started) / done * (state.max_steps - step))}"
            log(numbers, step)
            shown = ", ".join(f"{k.removeprefix('train/')}={numbers[k]:.4g}" for k in _shown(numbers))
            logger.info("[%s] step %d/%d %s%s", stage, step, state.max_steps, shown, speed)

        def on_step_end(self, args, state, control, **kwargs):
            self.progress.update(state.global_step, state.max_steps)

    return _StepLogger()


def _shown(numbers: dict[str, float]) -> list[str]:
    """The few numbers a progress line shows: the loss, then what tells a method's progress (DPO's reward margin
    and accuracy, RL's reward), then the learning rate."""
    wanted = ("train/loss", "eval/loss", "train/rewards/margins", "train/rewards/accuracies", "train/reward",
              "train/learning_rate")
    return [k for k in wanted if k in numbers] or list(numbers)[:3]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train_with_checkpoints(trainer, checkpoints=None) -> dict[str, float]:
    """trainer.train(), resuming from the newest stored checkpoint when there is one; periodic checkpoints
    (training.checkpoint_steps) are uploaded as they are written. Returns {"train/resumed_from_step"}."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if any(getattr(cb, "replaces_library_printing", False) for cb in trainer.callback_handler.callbacks):
        # One line per logged step from our step logger; not transformers' dict of every logged value too.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    resume = None
    if checkpoints is not None:
        trainer.add_callback(checkpoints.callback())
        resume = checkpoints.latest()
    if resume is None:
        trainer.train()
        return {}
    import json

    step = json.loads((resume / "trainer_state.json").read_text())["global_step"]
    logger.info("resuming from checkpoint %s (step %d)", resume, step)
    trainer.train(resume_from_checkpoint=str(resume))
    return {"train/resumed_from_step": float(step)}


def final_train_metrics(trainer, prefix: str = "train") -> dict[str, float]:
    history = [h for h in trainer.state.log_history if "loss" in h]
    out = {f"{prefix}/steps": float(trainer.state.global_step), f"{prefix}/processes": float(trainer.args.world_size)}
    runtime = [h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h]
    if runtime:
        out[f"{prefix}/runtime_seconds"] = float(runtime[-1])
    tokens = [h["num_tokens"] for h in trainer.state.log_history if isinstance(h.get("num_tokens"), (int, float))]
    if tokens:  # TRL's count of the (non-padding) tokens trained on
        out[f"{prefix}/tokens"] = float(tokens[-1])
    if history:
        out[f"{prefix}/final_loss"] = float(history[-1]["loss"])
        out[f"{prefix}/first_loss"] = float(history[0]["loss"])
        for name in ("reward", "kl"):  # online RL (GRPO): the mean reward of the last rollouts, the KL to the start
            if isinstance(history[-1].get(name), (int, float)):
                out[f"{prefix}/final_{name}"] = float(history[-1][name])
    return out
