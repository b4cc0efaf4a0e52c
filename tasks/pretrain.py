"""Optional `pretrain` stage: a tokenizer and a tiny causal LM trained from scratch on a text corpus.

It exists so that the demo needs no download. Real recipes disable it and name a Hub id or a path
in `model.base`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tasks.kinds import StageKind
from tasks.training import Section, TrainingSettings


class PretrainConfig(Section):
    corpus: str = Field(
        "synthetic:arithmetic/corpus",
        description="Text corpus: a synthetic:... source, or a JSONL/Parquet/CSV path or URI with a `text` column.",
    )
    vocab_size: int = Field(320, ge=64, description="BPE vocabulary size of the tokenizer trained here.")
    hidden_size: int = Field(64, ge=8, description="Model width.")
    layers: int = Field(2, ge=1, description="Number of transformer layers.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    intermediate_size: int = Field(256, ge=8, description="MLP width.")
    max_position_embeddings: int = Field(128, ge=16, description="Longest sequence the model supports.")
    training: TrainingSettings = Field(
        default_factory=lambda: TrainingSettings(learning_rate=3e-3, epochs=2, batch_size=32, max_length=64),
        description="Language-model training of the fresh model on the corpus.",
    )


def pretrain(cfg: PretrainConfig, texts: list[str], out: Path, seed: int, callbacks=(),
             checkpoints=None) -> dict[str, float]:
    """Train a tokenizer and a LlamaForCausalLM from scratch on texts; save both to out."""
    import tempfile

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tasks.modeling import build_tokenizer, save_model
    from tasks.training import final_train_metrics, train_with_checkpoints, seed_everything, trainer_kwargs

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
    save_model(trainer.model, tokenizer, out)
    metrics = {**final_train_metrics(trainer), **resumed}
    metrics["model/parameters"] = float(sum(p.numel() for p in model.parameters()))
    return metrics


def _train(cfg: PretrainConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.data import DatasetSource
    from tasks.sources import read_rows

    texts = [row["text"] for _, row in read_rows(DatasetSource(source=cfg.corpus)) if row.get("text")]
    if not texts:
        raise ValueError(f"pretrain.corpus: {cfg.corpus} has no rows with a non-empty `text` field")
    return pretrain(cfg, texts, out, ctx.seed, ctx.callbacks(), ctx.checkpoints(cfg.training))


def _work(cfg: PretrainConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.launch import run_training

    return run_training(_train, cfg.training, cfg, inputs, out, ctx)


KIND = StageKind(
    name="pretrain",
    description="A tokenizer and a tiny Llama trained from scratch on a text corpus (the demo's base model).",
    config=PretrainConfig,
    inputs={},
    output="policy",
    work=_work,
    headline=("train/final_loss",),
    source_inputs=lambda cfg: _corpus_ref(cfg),
)


def _corpus_ref(cfg: PretrainConfig) -> dict[str, dict]:
    from tasks.data import DatasetSource
    from tasks.sources import fingerprint

    return {"corpus": {"uri": cfg.corpus, **fingerprint(DatasetSource(source=cfg.corpus)), "kind": "source"}}
