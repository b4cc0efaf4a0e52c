"""One stage's training as a bare TRL script: no Prefect, no MLflow, no artifact store, no posttrain code.
The yardstick for bench/real_model.py (what the same trainer costs on the same rows without the stage around it).

    python bench/bare_trl_real_model.py sft|dpo --data PREPARED --model FOLDER --out DIR --steps N --json PATH

PREPARED is a prepare_data output (its Parquet splits are read as they are); FOLDER a save_pretrained model (the
converted GGUF). Hyperparameters: those of configs/smollm2-word-problems.yaml, written out here. SFT also
computes the held-out loss, as the stage does.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("sft", "dpo"))
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True, type=Path)
    args = parser.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    kind = "sft" if args.stage == "sft" else "preference"
    files = sorted(str(p) for p in (args.data / kind).glob("train*.parquet"))
    train = datasets.Dataset.from_parquet(files)
    train = train.remove_columns([c for c in ("source", "row", "task") if c in train.column_names])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    common = dict(output_dir=str(args.out / "scratch"), max_steps=args.steps, per_device_train_batch_size=8,
                  lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=10, use_cpu=True, bf16=False,
                  gradient_checkpointing=False, seed=args.seed, data_seed=args.seed, report_to="none",
                  save_strategy="no", max_length=256, disable_tqdm=True, dataloader_num_workers=0)
    if args.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common, learning_rate=5e-5, completion_only_loss=True),
                             train_dataset=train, processing_class=tokenizer)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common, learning_rate=5e-6, beta=0.1),
                             train_dataset=train, processing_class=tokenizer)
    trainer.train()
    held_out = sorted(str(p) for p in (args.data / kind).glob("eval*.parquet"))
    if args.stage == "sft" and held_out:  # the stage reports the held-out loss too: the same work here
        rows = datasets.Dataset.from_parquet(held_out)
        trainer.evaluate(rows.remove_columns([c for c in ("source", "row", "task") if c in rows.column_names]))
    trainer.model.save_pretrained(args.out / "model")
    tokenizer.save_pretrained(args.out / "model")
    seconds = time.perf_counter() - started
    tokens = max((h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h), default=0.0)
    result = {"seconds": seconds, "tokens": tokens, "final_loss": next(
        (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    args.json.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
