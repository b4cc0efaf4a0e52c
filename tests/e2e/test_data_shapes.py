"""Prepared data in the public shapes trains as intended: every assistant turn of a multi-turn chat is a
training target and nothing else is; the prompt is never in the loss."""

import json

from tasks.kinds.prepare_data import DataConfig, DatasetSource, prepare_data
from tasks.kinds.sft import SFTStageConfig, sft_trainer


def test_every_assistant_turn_and_only_those_are_trained(prepared, tmp_path):
    _, root = prepared
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Add {i} and 1."},
                          {"role": "assistant", "content": str(i + 1)}, {"role": "user", "content": "Double it."},
                          {"role": "assistant", "content": str(2 * i + 2)}]} for i in range(1, 21)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data").mkdir()
    prepare_data(DataConfig(sft=DatasetSource(source=str(tmp_path / "chat.jsonl")), eval_fraction=0.0),
                 tmp_path / "data", seed=0)
    cfg = SFTStageConfig(training={"max_length": 128})
    trainer = sft_trainer(cfg, tmp_path / "data", root / "base", tmp_path / "scratch", seed=0)
    tokenizer = trainer.processing_class
    for example in trainer.train_dataset:
        trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
        text = tokenizer.decode(example["input_ids"])
        first, second = (text.split("<|assistant|>")[k].split("<|end|>")[0] for k in (1, 2))
        assert trained == f"{first}<|end|>{second}<|end|>", (text, trained)
        assert "Double it." in text and "Double it." not in trained


def test_continued_pretraining_on_a_prepared_text_kind(prepared, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.machinery.splits import load_split
    from tasks.kinds.pretrain import PretrainConfig, _texts, continue_pretraining

    _, root = prepared
    docs = [{"text": f"{i} plus {i} makes {2 * i}. Counting on: {i} {i + 1} {i + 2}."} for i in range(200)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs + docs[:20]))
    (tmp_path / "data").mkdir()
    stats = prepare_data(DataConfig(text=DatasetSource(source=str(tmp_path / "corpus.jsonl"))), tmp_path / "data", 0)
    assert stats["text/duplicates_removed"] == 20
    cfg = PretrainConfig(corpus=None, training={"max_steps": 8, "batch_size": 8, "learning_rate": 1e-3,
                                                "logging_steps": 1})
    texts = _texts(cfg, {"data": tmp_path / "data"})
    assert len(texts) == len(load_split(tmp_path / "data", "text", "train")) == stats["text/train_rows"]
    metrics = continue_pretraining(cfg, texts, root / "base", tmp_path / "out", seed=0)
    assert metrics["train/steps"] == 8 and metrics["train/final_loss"] < metrics["train/first_loss"]
    before = AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    try:
        _texts(PretrainConfig(training={"max_steps": 1}), {"data": tmp_path / "data"})
        raise AssertionError("corpus and data together must be refused")
    except ValueError as e:
        assert "set corpus: null" in str(e)


def test_evaluation_reports_each_task_of_a_mixture(prepared, tmp_path):
    from tasks.kinds.evaluate import EvaluateConfig, evaluate

    _, root = prepared
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "reference": str(i + 1)})
                                                 + "\n" for i in range(6)))
    (tmp_path / "words.jsonl").write_text("".join(json.dumps({"prompt": f"Spell {w}.", "reference": w}) + "\n"
                                                  for w in ("cat", "dog", "owl")))
    (tmp_path / "data").mkdir()
    prepare_data(DataConfig(eval=[DatasetSource(source=str(tmp_path / "sums.jsonl")),
                                  DatasetSource(source=str(tmp_path / "words.jsonl"), task="spelling")]),
                 tmp_path / "data", 0)
    (tmp_path / "out").mkdir()
    metrics = evaluate(EvaluateConfig(max_new_tokens=4), tmp_path / "data", {"base": root / "base"}, None,
                       tmp_path / "out", seed=0)
    assert {"base/task_accuracy", "base/task_accuracy/sums", "base/task_accuracy/spelling"} <= set(metrics)
    overall = (6 * metrics["base/task_accuracy/sums"] + 3 * metrics["base/task_accuracy/spelling"]) / 9
    assert abs(metrics["base/task_accuracy"] - overall) < 1e-9
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert sorted({r["task"] for r in rows}) == ["spelling", "sums"]
