import json

import pandas as pd
import pytest

from tasks import synthetic
from tasks.data import DataConfig, DataError, DatasetSource, normalize, prepare_data, read_rows, source_fingerprint


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(tmp_path, seed=0, **sources):
    cfg = DataConfig(**{k: DatasetSource(source=v) for k, v in sources.items()}, eval_fraction=0.2)
    out = tmp_path / f"out-{seed}"
    out.mkdir(exist_ok=True)
    return prepare_data(cfg, out, seed), out


SFT = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_each_file_format_reads_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"sft.{fmt}"
    if fmt == "jsonl":
        _jsonl(path, SFT)
    elif fmt == "json":
        path.write_text(json.dumps(SFT))
    elif fmt == "parquet":
        pd.DataFrame(SFT).to_parquet(path)
    else:
        pd.DataFrame(SFT).to_csv(path, index=False)
    rows = [r for _, r in read_rows(DatasetSource(source=str(path)))]
    assert rows == SFT


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list(SFT).save_to_disk(str(tmp_path / "ds"))
    rows = [r for _, r in read_rows(DatasetSource(source=f"hf:{tmp_path / 'ds'}"))]
    assert rows == SFT


def test_the_four_shapes_normalize_to_chat_messages():
    assert normalize("sft", {"prompt": "hi", "completion": "yo"}, "x") == {
        "prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}]}
    assert normalize("sft", chat, "x")["completion"] == [{"role": "assistant", "content": "yo"}]
    assert len(normalize("sft", chat, "x")["prompt"]) == 2
    pref = normalize("preference", {"prompt": "p", "chosen": "c", "rejected": "r"}, "x")
    assert pref["chosen"][0]["content"] == "c" and pref["rejected"][0]["content"] == "r"
    assert normalize("unpaired", {"prompt": "p", "completion": "c", "label": "true"}, "x")["label"] is True
    assert normalize("eval", {"prompt": "p", "reference": 7}, "x")["reference"] == "7"


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"sft.jsonl: line 2: malformed JSON"),
    ('{"prompt": "a"}\n', r"sft.jsonl: row 1: field 'completion' is missing"),
    ('{"prompt": 5, "completion": "b"}\n', r"sft.jsonl: row 1: field 'prompt' must be a string, got int"),
    ('{"prompt": "  ", "completion": "b"}\n', r"sft.jsonl: row 1: field 'prompt' is empty"),
    ('[1, 2]\n', r"sft.jsonl: row 1: expected an object, got list"),
    ('\n\n', r"sft.jsonl: the data set is empty"),
])
def test_bad_rows_fail_with_file_row_and_problem(tmp_path, content, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        _prepare(tmp_path, sft=str(path))
    assert not list(tmp_path.glob("out-0/*")), "nothing is written for bad data"


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl: line 2: not valid UTF-8"):
        _prepare(tmp_path, sft=str(path))


def test_preference_and_unpaired_errors_name_the_field(tmp_path):
    pref = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": ["x"]}])
    with pytest.raises(DataError, match=r"p.jsonl: row 1: rejected\[0\] must be an object"):
        _prepare(tmp_path, preference=pref)
    unpaired = _jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b", "label": "maybe"}])
    with pytest.raises(DataError, match=r"u.jsonl: row 1: field 'label' must be a boolean"):
        _prepare(tmp_path, unpaired=unpaired)


def test_an_empty_rejected_reply_is_data_but_an_empty_chosen_one_is_an_error(tmp_path):
    pref = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i} + 1", "chosen": str(i + 1), "rejected": ""} for i in range(20)])
    _, out = _prepare(tmp_path, preference=pref)
    rows = [json.loads(line) for split in ("train", "eval")
            for line in (out / "preference" / f"{split}.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(r["rejected"] == [{"role": "assistant", "content": ""}] for r in rows)
    bad = _jsonl(tmp_path / "q.jsonl", [{"prompt": "1 + 1", "chosen": " ", "rejected": "3"}])
    with pytest.raises(DataError, match=r"q.jsonl: row 1: field 'chosen' is empty"):
        _prepare(tmp_path, preference=bad)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        _prepare(tmp_path, sft=str(tmp_path / "nope.jsonl"))


def test_all_duplicates_and_overlong_rows_are_clear_errors(tmp_path):
    dup = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 5)
    metrics, _ = _prepare(tmp_path, sft=dup)
    assert metrics["sft/duplicates_removed"] == 4
    long = _jsonl(tmp_path / "l.jsonl", [{"prompt": "a" * 5000, "completion": "b"}])
    with pytest.raises(DataError, match=r"l.jsonl: no usable rows left \(1 read, 0 duplicates, 1 longer than"):
        _prepare(tmp_path, seed=1, sft=long)


def test_dedup_length_filter_and_split_are_deterministic(tmp_path):
    rows = SFT + SFT[:5] + [{"prompt": "x" * 5000, "completion": "y"}]
    src = _jsonl(tmp_path / "sft.jsonl", rows)
    metrics, out = _prepare(tmp_path, sft=src)
    assert metrics["sft/duplicates_removed"] == 5 and metrics["sft/too_long_removed"] == 1
    assert metrics["sft/train_rows"] + metrics["sft/eval_rows"] == 50
    assert 0 < metrics["sft/eval_rows"] < 25
    again = tmp_path / "again"
    again.mkdir()
    prepare_data(DataConfig(sft=DatasetSource(source=src), eval_fraction=0.2), again, 0)
    assert (again / "sft" / "eval.jsonl").read_bytes() == (out / "sft" / "eval.jsonl").read_bytes()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sft"]["rows_read"] == 56


def test_split_is_stable_when_rows_are_added(tmp_path):
    _, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "a.jsonl", SFT))
    more = SFT + [{"prompt": f"new{i}", "completion": "z"} for i in range(20)]
    dest = tmp_path / "out-more"
    dest.mkdir()
    prepare_data(DataConfig(sft=DatasetSource(source=_jsonl(tmp_path / "b.jsonl", more)), eval_fraction=0.2), dest, 0)
    old_eval = set((out / "sft" / "eval.jsonl").read_text().splitlines())
    new_eval = set((dest / "sft" / "eval.jsonl").read_text().splitlines())
    assert old_eval <= new_eval


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "sft.jsonl"
    _jsonl(path, SFT)
    before = source_fingerprint(DatasetSource(source=str(path)))
    _jsonl(path, SFT[:-1] + [{"prompt": "q49", "completion": "changed"}])
    assert source_fingerprint(DatasetSource(source=str(path))) != before


def test_synthetic_task_is_deterministic_and_eval_prompts_are_held_out():
    assert synthetic.generate("sft", seed=0) == synthetic.generate("sft", seed=0)
    train_prompts = {r["prompt"] for r in synthetic.generate("sft")} | {r["prompt"] for r in synthetic.generate("preference")}
    eval_rows = synthetic.generate("eval")
    assert eval_rows and not train_prompts & {r["prompt"] for r in eval_rows}
    pairs = synthetic.generate("preference")
    for row in pairs:
        assert row["chosen"] != row["rejected"]
    # The careful grader ranks the right sum above its neighbours and above non-answers.
    rejected = {row["rejected"] for row in pairs}
    assert {"", "?", "I don't know."} <= rejected and {str(n) for n in range(19)} <= rejected
    # The corpus holds training questions and counting runs only: never a question with its answer.
    questions = {r["prompt"] for r in synthetic.generate("sft")}
    for row in synthetic.generate("corpus"):
        text = row["text"]
        numbers = [int(t) for t in text.split()] if all(t.isdigit() for t in text.split()) else []
        is_count = bool(numbers) and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert text in questions or is_count, text
