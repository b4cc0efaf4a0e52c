"""The real-model recipe's data and checks: Hub-shaped files read right, verifiers, the forgetting prompts."""

import json
from pathlib import Path

import pytest

from tasks.blocks import word_problems

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_files_are_what_the_writer_makes_and_read_in_their_hub_shapes(tmp_path):
    from tasks.kinds.prepare_data import DataConfig, prepare_data
    from tasks.machinery.splits import load_split

    written = word_problems.write_files(tmp_path / "wp")
    for name in ("sft", "preference", "eval"):
        assert (tmp_path / "wp" / f"{name}.jsonl").read_bytes() == \
            (ROOT / "configs" / "word-problems" / f"{name}.jsonl").read_bytes(), f"rerun the writer for {name}"
    first = json.loads((tmp_path / "wp" / "preference.jsonl").read_text().splitlines()[0])
    assert first["chosen"][0] == {"role": "user", "content": first["prompt"]}  # UltraFeedback binarized

    out = tmp_path / "data"
    out.mkdir()
    cfg = DataConfig.model_validate({kind: {"source": str(tmp_path / "wp" / f"{kind}.jsonl")}
                                     for kind in ("sft", "preference", "eval")} | {"eval_fraction": 0.05,
                                     "near_dedup": {"enabled": False}, "decontaminate": {"enabled": False}})
    prepare_data(cfg, out, seed=0)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sft"]["train_rows"] + stats["sft"]["eval_rows"] == written["sft"]
    assert stats["preference"]["train_rows"] + stats["preference"]["eval_rows"] == written["preference"]
    pairs = load_split(out, "preference", "train")
    row = pairs[0]
    assert [m["role"] for m in row["chosen"]] == ["assistant"], "the prompt is not repeated inside chosen"
    sft = load_split(out, "sft", "train")[0]
    assert sft["prompt"][-1]["role"] == "user" and sft["completion"][0]["content"].splitlines()[-1].startswith("Answer:")
    assert load_split(out, "eval", "test")[0]["reference"].lstrip("-").isdigit()


def test_the_verifiers_check_the_format_and_the_number():
    replies = ["7 + 5 = 12\nAnswer: 12", "The answer is 12.", "7 + 5 = 13\nAnswer: 13", "Answer: 12\n",
               [{"role": "assistant", "content": "Answer: 12"}], "Answer: twelve"]
    assert word_problems.answer_format(None, replies) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert word_problems.answer_correct(None, replies, reference=["12"] * 6) == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="reference"):
        word_problems.answer_correct(None, replies)


def test_forgetting_prompts_are_read_with_errors_naming_the_line(tmp_path):
    from tasks.kinds.evaluate import read_prompts

    prompts = read_prompts(str(ROOT / "configs" / "word-problems" / "general.jsonl"))
    assert len(prompts) == 40 and prompts[0] == [{"role": "user", "content": "What is the capital of France?"}]
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"general.jsonl: line 2: expected"):
        read_prompts(str(bad))


def test_a_forgetting_anchor_that_is_not_an_input_is_refused_by_name():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"forgetting.anchor 'origin' is not an input"):
        load_config(ROOT / "configs" / "smollm2-word-problems.yaml", ["evaluate.forgetting.anchor=origin"])
