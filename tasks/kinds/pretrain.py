"""`pretrain` stage: language-model training on plain text.

Without a `base` input it trains a tokenizer and a tiny causal LM from scratch (the demo's base model, so
that the demo needs no download). With a `base` input (Hub id, folder, URI or another stage) it continues
pretraining that model. The text is the `corpus` source, or the `text` kind of a prepared `data` input
(deduplicated, decontaminated and mixed by prepare_data; set `corpus: null` then).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tasks.machinery.stagekind import Slot, StageKind
from tasks.machinery.training import Section, stage_training

PretrainTraining = stage_training("PretrainTraining", "continued pretraining of a real model (lr 2e-5, one epoch); "
                                  "the demo's from-scratch settings are in its recipes", learning_rate=2e-5, epochs=1.0)


class PretrainConfig(Section):
    corpus: str | None = Field(
        "synthetic:arithmetic/corpus",
        description="Text corpus: a synthetic:... source, or a JSONL/Parquet/CSV path or URI with a `text` column. "
        "Null when a prepared `data` input supplies the text.",
    )
    vocab_size: int = Field(320, ge=64, description="BPE vocabulary size of the tokenizer trained here.")
    hidden_size: int = Field(64, ge=8, description="Model width.")
    layers: int = Field(2, ge=1, description="Number of transformer layers.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    intermediate_size: int = Field(256, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(128, ge=16, description="Longest sequence the model supports.")
    training: PretrainTraining = Field(default_factory=PretrainTraining,
                                       description="Language-model training on the corpus.")


def pretrain(cfg: PretrainConfig, texts: list[str], out: Path, seed: int, callbacks=(),
             checkpoints=None) -> dict[str, float]:
    """Train a tokenizer and a LlamaForCausalLM from scratch on texts; save both to out."""
    import tempfile

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tasks.machinery.modeling import build_tokenizer, save_model
    from tasks.machinery.training import final_train_metrics, train_with_checkpoints, seed_everything, trainer_kwargs

    seed_everything(seed, cfg.training.deterministic_kernels)
    tokenizer = build_tokenizer(texts, cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    dataset = Dataset.from_dict({"text": texts})
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            **trainer_kwargs(cfg.training, Path(scratch), seed),
            max_length=cfg.training.max_length,
            dataset_text_field="text",
            packing=False,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks)
        )
        resumed = train_with_checkpoints(trainer, checkpoints)
    sizes = save_model(trainer.model, tokenizer, out)
    metrics = {**final_train_metrics(trainer), **resumed, **sizes}
    metrics["model/parameters"] = float(sum(p.numel() for p in model.parameters()))
    return metrics


def continue_pretraining(cfg: PretrainConfig, texts, base: Path | str, out: Path, seed: int, callbacks=(),
                         trust_remote_code: bool = False, checkpoints=None,
                         base_ref: dict | None = None) -> dict[str, float]:
    """Language-model training of an existing model (and its tokenizer) on `texts` (a list or a Dataset
    with a `text` column); saves the result to out."""
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tasks.machinery.modeling import load_causal_lm, load_tokenizer, save_model
    from tasks.machinery.training import (final_train_metrics, peft_config, seed_everything, train_with_checkpoints,
                                trainer_kwargs)

    seed_everything(seed, cfg.training.deterministic_kernels)
    tokenizer = load_tokenizer(base, trust_remote_code)
    model = load_causal_lm(base, trust_remote_code, for_training=True)
    dataset = texts if isinstance(texts, Dataset) else Dataset.from_dict({"text": list(texts)})
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(**trainer_kwargs(cfg.training, Path(scratch), seed), max_length=cfg.training.max_length,
                         dataset_text_field="text", packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config(cfg.training.lora), callbacks=list(callbacks))
        resumed = train_with_checkpoints(trainer, checkpoints)
    sizes = save_model(trainer.model, tokenizer, out, base=base_ref or base)
    return {**final_train_metrics(trainer), **resumed, **sizes}


def _texts(cfg: PretrainConfig, inputs: dict):
    from tasks.machinery.sources import DatasetSource
    from tasks.machinery.splits import load_split
    from tasks.machinery.sources import read_rows

    if inputs.get("data") is not None:
        if cfg.corpus is not None:
            raise ValueError("pretrain: both `corpus` and a `data` input name the text; set corpus: null")
        texts = load_split(inputs["data"], "text", "train")
        if texts is None:
            raise ValueError("pretrain: the prepared data has no text/train split; set data.text in the recipe")
        return texts
    if cfg.corpus is None:
        raise ValueError("pretrain: no text: set `corpus`, or give a `data` input with a prepared `text` kind")
    texts = [row["text"] for _, row in read_rows(DatasetSource(source=cfg.corpus)) if row.get("text")]
    if not texts:
        raise ValueError(f"pretrain.corpus: {cfg.corpus} has no rows with a non-empty `text` field")
    return texts


def _train(cfg: PretrainConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    texts = _texts(cfg, inputs)
    if inputs.get("base") is not None:
        return continue_pretraining(cfg, texts, inputs["base"], out, ctx.seed, ctx.callbacks(),
                                    ctx.trust_remote_code, ctx.checkpoints(cfg.training), ctx.refs.get("base"))
    if not isinstance(texts, list):
        texts = list(texts["text"])
    return pretrain(cfg, texts, out, ctx.seed, ctx.callbacks(), ctx.checkpoints(cfg.training))


def _work(cfg: PretrainConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery.launch import run_training

    return run_training(_train, cfg.training, cfg, inputs, out, ctx)


KIND = StageKind(
    name="pretrain",
    description="Language-model training on text: continued pretraining of a `base` model, or (no base) a "
    "tokenizer and a tiny Llama from scratch (the demo's base model).",
    config=PretrainConfig,
    inputs={
        "data": Slot("data", "prepared data whose `text` kind is the corpus", required=False, data=("text",)),
        "base": Slot("policy", "the model to continue pretraining (none: a new tiny model)", required=False),
    },
    output="policy",
    work=_work,
    headline=("train/final_loss",),
    source_inputs=lambda cfg, tracking_uri=None: _corpus_ref(cfg),
)


def _corpus_ref(cfg: PretrainConfig) -> dict[str, dict]:
    from tasks.machinery.sources import DatasetSource

    if cfg.corpus is None:
        return {}
    from tasks.machinery.sources import fingerprint

    return {"corpus": {"uri": cfg.corpus, **fingerprint(DatasetSource(source=cfg.corpus)), "kind": "source"}}
