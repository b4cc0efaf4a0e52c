"""`sft` stage: supervised fine-tuning with TRL's SFTTrainer, full or LoRA, chat template applied."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.machinery.stagekind import Slot, StageKind
from tasks.blocks.prompts import PROMPT_SLOT_HELP, prompt_source
from tasks.machinery.training import Section, stage_training

logger = logging.getLogger("posttrain")

SFTTraining = stage_training("SFTTraining", "TRL SFTConfig (lr 2e-5, max_length 1024, batch 8), one epoch as in the "
                             "alignment-handbook SFT recipes", learning_rate=2e-5, epochs=1.0)


class PromptTuningSettings(Section):
    enabled: bool = Field(False, description="Train soft prompt embeddings only (PEFT prompt tuning), the model "
                          "frozen; the output is the prompt (an adapter), loaded on top of the base by consumers.")
    num_virtual_tokens: int = Field(20, ge=1, description="Length of the soft prompt, in virtual tokens.")
    init_text: str | None = Field(None, description="Initialise the soft prompt from this text's token embeddings "
                                  "(PEFT's TEXT init); random when unset.")


class SFTStageConfig(Section):
    training: SFTTraining = Field(default_factory=SFTTraining, description="Hyperparameters of the fine-tuning run.")
    completion_only_loss: bool = Field(True, description="Train on the completion tokens only, not the prompt.")
    assistant_only_loss: bool | Literal["auto"] = Field(
        "auto", description="Train on assistant turns only (user and tool turns inside a multi-turn completion are "
        "context). 'auto': on when the data has multi-turn completions. With {% generation %} markers in the chat "
        "template TRL masks by them; without (SmolLM2, Qwen2.5, Llama 3 as shipped) the assistant's tokens are found "
        "by rendering each turn's prefix (tasks/machinery/chat.py).")
    prompt_tuning: PromptTuningSettings = Field(default_factory=PromptTuningSettings,
                                                description="Soft-prompt tuning instead of full or LoRA fine-tuning.")
    prompt: str | None = Field(None, description="A prompt template every training prompt is formatted with: a "
                               "registered prompt (prompts:/name/version, prompts:/name@alias, e.g. a prompt_search "
                               "winner) or an inline {{question}} template (tasks/blocks/prompts.py).")

    @model_validator(mode="after")
    def _one_peft_method(self) -> "SFTStageConfig":
        if self.prompt_tuning.enabled and self.training.lora.enabled:
            raise ValueError("choose one of training.lora and prompt_tuning")
        return self


def train_sft(cfg: SFTStageConfig, data: Path, base: Path, out: Path, seed: int, callbacks=(),
              trust_remote_code: bool = False, checkpoints=None, base_ref: dict | None = None,
              template: list[dict] | None = None) -> dict[str, float]:
    """Fine-tune the model at `base` on the prepared sft split; save the model (or the adapter) to `out`."""
    from tasks.machinery.splits import load_split
    from tasks.machinery.modeling import save_model
    from tasks.machinery.training import final_train_metrics, train_with_checkpoints

    held_out = formatted(load_split(data, "sft", "eval"), template)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = sft_trainer(cfg, data, base, Path(scratch), seed, callbacks, trust_remote_code, template)
        tokenizer = trainer.processing_class
        if held_out is not None and trainer.masks_by_rendering:
            from tasks.machinery.chat import assistant_only_dataset

            held_out = assistant_only_dataset(held_out, tokenizer, "sft/eval")
        resumed = train_with_checkpoints(trainer, checkpoints)
        metrics = {**final_train_metrics(trainer), **resumed}
        if held_out is not None:
            metrics["eval/loss"] = float(trainer.evaluate(held_out)["eval_loss"])
    metrics.update(save_model(trainer.model, tokenizer, out, base=base_ref or base))
    return metrics


def formatted(rows, template: list[dict] | None):
    """The rows with each prompt asked through the template (tasks/blocks/prompts.py)."""
    if rows is None or not template:
        return rows
    from tasks.blocks.prompts import wrap

    return rows.map(lambda row: {"prompt": wrap(template, row["prompt"])})


def sft_trainer(cfg: SFTStageConfig, data: Path, base: Path, scratch: Path, seed: int, callbacks=(),
                trust_remote_code: bool = False, template: list[dict] | None = None):
    """TRL's SFTTrainer on the prepared sft split, its examples tokenized and masked (not yet trained)."""
    import json

    from trl import SFTConfig, SFTTrainer

    from tasks.machinery.chat import assistant_only_dataset, has_generation_markers
    from tasks.machinery.splits import load_split
    from tasks.machinery.modeling import load_causal_lm, load_tokenizer
    from tasks.machinery.training import peft_config, seed_everything, trainer_kwargs

    seed_everything(seed, cfg.training.deterministic_kernels)
    train = formatted(load_split(data, "sft", "train"), template)
    if train is None:
        raise ValueError("sft: the prepared data has no sft/train split; set data.sft in the recipe")
    assistant_only = cfg.assistant_only_loss
    stats = json.loads((Path(data) / "stats.json").read_text()).get("sft", {})
    context_turns = stats.get("context_turn_rows", 0) > 0  # replies with weight 0 inside a completion
    if assistant_only == "auto":
        assistant_only = stats.get("multi_turn_rows", 0) > 0
    if context_turns and not assistant_only:
        raise ValueError(f"sft.assistant_only_loss: {stats['context_turn_rows']} rows have assistant turns with "
                         "weight 0 inside their completion, which only the assistant-only loss leaves untrained; "
                         "set it to true or auto")
    tokenizer = load_tokenizer(base, trust_remote_code)
    by_rendering = assistant_only and (context_turns or not has_generation_markers(tokenizer))
    if by_rendering:  # no {% generation %} markers, or replies with weight 0: the trained tokens found by rendering
        train = assistant_only_dataset(train, tokenizer)
    logger.info("sft: loss on %s", "the assistant turns (found by rendering the template; tasks/machinery/chat.py)"
                if by_rendering else "the assistant turns (the template's generation markers)" if assistant_only
                else "the completions" if cfg.completion_only_loss else "every token")
    model = load_causal_lm(base, trust_remote_code, for_training=True)
    args = SFTConfig(
        **trainer_kwargs(cfg.training, scratch, seed),
        max_length=cfg.training.max_length,
        completion_only_loss=cfg.completion_only_loss,
        assistant_only_loss=assistant_only and not by_rendering,
        packing=False,
    )
    peft = peft_config(cfg.training.lora)
    if cfg.prompt_tuning.enabled:
        from peft import PromptTuningConfig

        init = cfg.prompt_tuning.init_text
        peft = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prompt_tuning.num_virtual_tokens,
                                  prompt_tuning_init="TEXT" if init else "RANDOM", prompt_tuning_init_text=init,
                                  tokenizer_name_or_path=str(base) if init else None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft, callbacks=list(callbacks))
    trainer.masks_by_rendering = by_rendering
    return trainer


def _train(cfg: SFTStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.blocks.prompts import template_of

    return train_sft(cfg, inputs["data"], inputs["base"], out, ctx.seed, ctx.callbacks(), ctx.trust_remote_code,
                     ctx.checkpoints(cfg.training), ctx.refs.get("base"), template_of(inputs))


def _work(cfg: SFTStageConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery.launch import run_training
    from tasks.machinery.splits import log_data_split

    log_data_split(ctx, inputs["data"], "sft")
    return run_training(_train, cfg.training, cfg, inputs, out, ctx)


KIND = StageKind(
    name="sft",
    description="Supervised fine-tuning (TRL SFTTrainer), full or LoRA, on the sft demonstrations.",
    config=SFTStageConfig,
    inputs={
        "data": Slot("data", "prepared data with sft demonstrations", data=("sft",)),
        "base": Slot("policy", "the model to fine-tune"),
        "prompt": Slot("prompt", PROMPT_SLOT_HELP, required=False),
    },
    output="policy",
    work=_work,
    headline=("train/final_loss", "eval/loss"),
    source_inputs=lambda cfg, tracking_uri=None: prompt_source(cfg.prompt, tracking_uri),
)
