import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.machinery import synthetic
from tasks.kinds.prepare_data import DataConfig, DataError, DatasetSource, prepare_data, split_files
from tasks.machinery.splits import load_split
from tasks.blocks.shapes import Identical, normalize
from tasks.machinery.sources import fingerprint, read_batches, read_rows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(tmp_path, seed=0, settings=None, name=None, **sources):
    settings = {"eval_fraction": 0.2, **(settings or {})}
    cfg = DataConfig(**{k: v if isinstance(v, list) else DatasetSource(source=v) for k, v in sources.items()},
                     **settings)
    out = tmp_path / (name or f"out-{seed}")
    out.mkdir(exist_ok=True)
    return prepare_data(cfg, out, seed), out


def _rows(out, kind, split):
    return [r for f in split_files(out, kind, split) for r in pq.read_table(f).to_pylist()]


def _all_rows(out, kind):
    return _rows(out, kind, "train") + _rows(out, kind, "eval")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def plain(messages):
    return [{"role": m["role"], "content": m["content"]} for m in messages]


SFT = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)]


# ---- reading ----------------------------------------------------------------------------------


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


def test_sources_stream_in_batches(tmp_path):
    path = _jsonl(tmp_path / "sft.jsonl", SFT)
    batches = list(read_batches(DatasetSource(source=path), batch_rows=8))
    assert [len(b) for b in batches] == [8] * 6 + [2] and batches[-1][-1][0] == 50
    pd.DataFrame(SFT).to_parquet(tmp_path / "sft.parquet", row_group_size=10)
    assert len(list(read_batches(DatasetSource(source=str(tmp_path / "sft.parquet")), batch_rows=8))) == 7


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_list(SFT).save_to_disk(str(tmp_path / "ds"))
    rows = [r for _, r in read_rows(DatasetSource(source=f"hf:{tmp_path / 'ds'}"))]
    assert rows == SFT


def test_a_bom_and_crlf_line_ends_are_valid_jsonl(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in SFT[:20]))
    metrics, out = _prepare(tmp_path, sft=str(path))
    assert metrics["sft/rows_read"] == 20 and len(_all_rows(out, "sft")) == 20
    assert _all_rows(out, "sft")[0]["completion"][0]["content"].startswith("a")


# ---- the shapes of the public data sets -----------------------------------------------------------


def test_prompt_completion_rows():
    row = normalize("sft", {"prompt": "hi", "completion": "yo"}, "x")
    assert plain(row["prompt"]) == [user("hi")] and plain(row["completion"]) == [bot("yo")]


def test_chat_messages_keep_the_system_prompt_and_every_assistant_turn():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, user("hi"), bot("yo"), user("and?"),
                         bot("done")]}
    row = normalize("sft", chat, "x")
    assert plain(row["prompt"]) == [{"role": "system", "content": "Be brief."}, user("hi")]
    assert plain(row["completion"]) == [bot("yo"), user("and?"), bot("done")]


def test_ultrachat_prompt_plus_messages():
    row = {"prompt": "How do tides work?", "prompt_id": "abc",
           "messages": [user("How do tides work?"), bot("The moon."), user("And the sun?"), bot("It helps.")]}
    out = normalize("sft", row, "x")
    assert plain(out["prompt"]) == [user("How do tides work?")]
    assert [m["content"] for m in out["completion"]] == ["The moon.", "And the sun?", "It helps."]
    # messages that leave the prompt out get it as the first user turn
    out = normalize("sft", {"prompt": "Q?", "messages": [bot("A.")]}, "x")
    assert plain(out["prompt"]) == [user("Q?")] and plain(out["completion"]) == [bot("A.")]


def test_preference_with_an_explicit_prompt():
    row = normalize("preference", {"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "x")
    assert plain(row["prompt"]) == [user("2+2?")] and plain(row["chosen"]) == [bot("4")]
    assert plain(row["rejected"]) == [bot("5")]


def test_ultrafeedback_binarized_rows_do_not_repeat_the_prompt():
    row = {"prompt": "Name a color.", "prompt_id": "p1", "score_chosen": 8.0, "score_rejected": 3.0,
           "chosen": [user("Name a color."), bot("Blue.")], "rejected": [user("Name a color."), bot("Seven.")]}
    out = normalize("preference", row, "x")
    assert plain(out["prompt"]) == [user("Name a color.")]
    assert plain(out["chosen"]) == [bot("Blue.")] and plain(out["rejected"]) == [bot("Seven.")]


def test_implicit_prompt_is_the_shared_prefix():
    system = {"role": "system", "content": "You are terse."}
    row = {"chosen": [system, user("Capital of France?"), bot("Paris.")],
           "rejected": [system, user("Capital of France?"), bot("Lyon.")]}
    out = normalize("preference", row, "x")
    assert plain(out["prompt"]) == [system, user("Capital of France?")]
    assert plain(out["chosen"]) == [bot("Paris.")] and plain(out["rejected"]) == [bot("Lyon.")]


def test_a_prompt_that_contradicts_the_conversation_is_an_error():
    with pytest.raises(DataError, match=r"x: 'chosen' and 'rejected' start with a conversation that is not"):
        normalize("preference", {"prompt": "other", "chosen": [user("q"), bot("a")],
                                 "rejected": [user("q"), bot("b")]}, "x")


def test_unpaired_feedback_rows():
    out = normalize("unpaired", {"prompt": "p", "completion": "c", "label": False}, "x")
    assert out["label"] is False and plain(out["completion"]) == [bot("c")]
    assert normalize("unpaired", {"prompt": "p", "completion": "c", "label": "true"}, "x")["label"] is True


def test_text_rows_for_continued_pretraining(tmp_path):
    src = _jsonl(tmp_path / "corpus.jsonl", [{"text": f"document number {i} about tides"} for i in range(30)])
    metrics, out = _prepare(tmp_path, text=src)
    assert metrics["text/train_rows"] + metrics["text/eval_rows"] == 30
    assert load_split(out, "text", "train").column_names == ["text"]
    with pytest.raises(DataError, match=r"row 1: field 'text' is missing"):
        normalize("text", {"content": "x"}, "row 1")


def test_alpaca_mapping():
    with_input = normalize("sft", {"instruction": "Translate.", "input": "chat", "output": "cat"}, "x")
    assert plain(with_input["prompt"]) == [user("Translate.\n\nchat")]
    assert plain(with_input["completion"]) == [bot("cat")]
    no_input = normalize("sft", {"instruction": "Say hi.", "input": "", "output": "hi"}, "x")
    assert plain(no_input["prompt"]) == [user("Say hi.")]


def test_sharegpt_mapping():
    row = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                             {"from": "gpt", "value": "bye!"}]}
    out = normalize("sft", row, "x")
    assert plain(out["prompt"]) == [{"role": "system", "content": "Be kind."}, user("hi")]
    assert plain(out["completion"]) == [bot("hello"), user("bye"), bot("bye!")]
    with pytest.raises(DataError, match=r"x: conversations\[0\] needs 'from'"):
        normalize("sft", {"conversations": [{"from": "robot", "value": "?"}]}, "x")


TOOL_ROW = {
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    "messages": [
        user("Weather in Oslo?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "name": "weather", "tool_call_id": "c1", "content": "{\"celsius\": 3}"},
        bot("3 °C in Oslo."),
    ],
}


def test_tool_calls_and_the_tool_role_survive_preparation(tmp_path):
    src = _jsonl(tmp_path / "tools.jsonl", [TOOL_ROW] * 1 + [
        {"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(9)])
    metrics, out = _prepare(tmp_path, sft=src, settings={"eval_fraction": 0.0})
    assert metrics["sft/tool_rows"] == 1 and metrics["sft/multi_turn_rows"] == 1
    ds = load_split(out, "sft", "train")
    row = next(r for r in ds if r["tools"])
    call = row["completion"][0]["tool_calls"][0]
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert row["completion"][1]["role"] == "tool" and row["completion"][1]["tool_call_id"] == "c1"
    assert json.loads(row["tools"])[0]["function"]["name"] == "weather"
    # a kind without tools has plain {role, content} messages, as every chat template expects
    _, plain_out = _prepare(tmp_path, seed=1, sft=_jsonl(tmp_path / "p.jsonl", SFT))
    assert set(load_split(plain_out, "sft", "train")[0]["prompt"][0]) == {"role", "content"}


# ---- errors --------------------------------------------------------------------------------


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
    assert not [p for p in tmp_path.glob("out-0/**/*") if p.is_file()], "nothing is written for bad data"


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


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        _prepare(tmp_path, sft=str(tmp_path / "nope.jsonl"))


# ---- rows that teach nothing ------------------------------------------------------------------


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": f"{i}+1?", "chosen": str(i + 1), "rejected": str(i)} for i in range(20)]
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[7] = {"chosen": [user("x?"), bot("same")], "rejected": [user("x?"), bot("same")]}
    with pytest.raises(Identical):
        normalize("preference", rows[3], "x")
    metrics, out = _prepare(tmp_path, preference=_jsonl(tmp_path / "p.jsonl", rows))
    assert metrics["preference/identical_pairs_removed"] == 2 and len(_all_rows(out, "preference")) == 18
    stats = json.loads((out / "stats.json").read_text())["preference"]
    assert stats["first_rows_removed"]["identical_pairs_removed"] == [4, 8]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert {(r["reason"], r["row"]) for r in removed} == {("identical_pairs_removed", 4), ("identical_pairs_removed", 8)}


def test_too_long_rows_are_counted_with_their_row_numbers(tmp_path):
    rows = SFT + SFT[:5] + [{"prompt": "x" * 5000, "completion": "y"}]
    src = _jsonl(tmp_path / "sft.jsonl", rows)
    metrics, out = _prepare(tmp_path, sft=src)
    assert metrics["sft/duplicates_removed"] == 5 and metrics["sft/too_long_removed"] == 1
    assert metrics["sft/train_rows"] + metrics["sft/eval_rows"] == 50
    assert 0 < metrics["sft/eval_rows"] < 25
    stats = json.loads((out / "stats.json").read_text())["sft"]
    assert stats["rows_read"] == 56 and stats["first_rows_removed"]["too_long_removed"] == [56]


def test_a_data_set_shrunk_below_the_minimum_is_refused_with_the_counts(tmp_path):
    dup = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 5 + [{"prompt": "c" * 5000,
                                                                                      "completion": "d"}])
    with pytest.raises(DataError, match=r"sft \(.*d.jsonl\): 1 train rows left, fewer than data.min_rows=3 \(6 read, "
                       r"1 longer than data.max_chars=4000, 0 pairs with chosen == rejected, 0 with an empty reply, 0 "
                       r"with every reply at weight 0, 0 contaminated, 4 exact and 0 near duplicates\)"):
        _prepare(tmp_path, sft=dup, settings={"min_rows": 3, "eval_fraction": 0.0, "min_kept_fraction": 0.0})
    assert not [p for p in tmp_path.glob("out-0/**/*.parquet")]


def test_split_is_deterministic_and_stable_when_rows_are_added(tmp_path):
    _, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "a.jsonl", SFT))
    _, again = _prepare(tmp_path, name="again", sft=_jsonl(tmp_path / "a2.jsonl", SFT))
    content = lambda rows: [(r["prompt"], r["completion"]) for r in rows]  # noqa: E731
    assert content(_rows(out, "sft", "eval")) == content(_rows(again, "sft", "eval"))
    more = SFT + [{"prompt": f"new{i}", "completion": "z"} for i in range(20)]
    _, dest = _prepare(tmp_path, name="grown", sft=_jsonl(tmp_path / "b.jsonl", more))
    key = lambda r: r["prompt"][0]["content"]  # noqa: E731
    assert {key(r) for r in _rows(out, "sft", "eval")} <= {key(r) for r in _rows(dest, "sft", "eval")}


def test_the_result_does_not_depend_on_batches_or_processes(tmp_path):
    rows = [{"prompt": f"question {i} " + "word " * 30, "completion": f"answer {i % 40} " + "more " * 20}
            for i in range(3000)]
    src = _jsonl(tmp_path / "sft.jsonl", rows + rows[:100])
    _, one = _prepare(tmp_path, name="one", sft=src, settings={"workers": 1, "shard_rows": 1000})
    _, two = _prepare(tmp_path, name="two", sft=src, settings={"workers": 2, "shard_rows": 1000, "batch_rows": 700})
    assert len(split_files(one, "sft", "train")) >= 2, "sharded output"
    assert _rows(one, "sft", "train") == _rows(two, "sft", "train")
    assert json.loads((one / "stats.json").read_text()) == json.loads((two / "stats.json").read_text())


# ---- mixtures --------------------------------------------------------------------------------


def test_a_mixture_of_sources_with_weights(tmp_path):
    math = _jsonl(tmp_path / "math.jsonl", [{"prompt": f"{i}+{i}?", "completion": str(2 * i)} for i in range(400)])
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [user(f"hello {i}"), bot(f"hi {i}")]} for i in range(100)])
    sources = [DatasetSource(source=math, weight=0.25), DatasetSource(source=chat, weight=2.0, task="smalltalk")]
    metrics, out = _prepare(tmp_path, sft=sources)
    rows = _all_rows(out, "sft")
    by_task = {t: sum(r["task"] == t for r in rows) for t in ("math", "smalltalk")}
    assert by_task["smalltalk"] == 200, "weight 2.0: every row twice"
    assert 70 <= by_task["math"] <= 130, "weight 0.25: about a quarter of 400, sampled"
    assert {(r["source"], r["task"]) for r in rows} == {(0, "math"), (1, "smalltalk")}
    stats = json.loads((out / "stats.json").read_text())["sft"]
    assert [s["rows_in_mix"] for s in stats["sources"]] == [by_task["math"], 200]
    assert metrics["sft/mix/smalltalk"] == pytest.approx(200 / (200 + by_task["math"]))
    # the same seed resolves the same rows; another seed other rows
    _, again = _prepare(tmp_path, seed=0, sft=sources)
    assert [(r["source"], r["row"]) for r in _all_rows(again, "sft")] == [(r["source"], r["row"]) for r in rows]
    _, other = _prepare(tmp_path, seed=5, sft=sources)
    assert {r["row"] for r in _all_rows(other, "sft") if r["source"] == 0} != {r["row"] for r in rows if r["source"] == 0}


def test_eval_rows_keep_their_task_for_per_task_metrics(tmp_path):
    a = _jsonl(tmp_path / "arith.jsonl", [{"prompt": f"{i}+1?", "reference": str(i + 1)} for i in range(5)])
    b = _jsonl(tmp_path / "trivia.jsonl", [{"prompt": f"capital {i}?", "reference": "x"} for i in range(3)])
    _, out = _prepare(tmp_path, eval=[DatasetSource(source=a), DatasetSource(source=b)])
    ds = load_split(out, "eval", "test", keep_tags=True)
    assert sorted(set(ds["task"])) == ["arith", "trivia"] and len(ds) == 8
    assert "task" not in load_split(out, "eval", "test").column_names


# ---- near duplicates and contamination ----------------------------------------------------------


def _paragraph(i, words=60):
    import random

    rng = random.Random(i)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta",
                                "lambda", "tau", "rho", "chi", "psi", "nu", "mu"]) + str(rng.randint(0, 99))
                    for _ in range(words))


def test_near_duplicates_are_removed_and_distinct_rows_kept(tmp_path):
    rows = [{"prompt": f"Summarize text {i}.", "completion": _paragraph(i)} for i in range(200)]
    near = []
    for i in range(0, 40):
        words = rows[i]["completion"].split()
        words[10] = "changed"
        near.append({"prompt": rows[i]["prompt"], "completion": " ".join(words)})
    metrics, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "s.jsonl", rows + near))
    assert metrics["sft/duplicates_removed"] == 0
    assert metrics["sft/near_duplicates_removed"] >= 36, "one word changed in 60: near duplicates"
    kept = {r["row"] for r in _all_rows(out, "sft")}
    assert sum(r <= 200 for r in kept) >= 198, "the first occurrence is kept; distinct rows are not merged"
    # short rows are left to exact dedup: '2 + 2 = 4' and '2 + 2 = 5' differ
    short = [{"prompt": f"What is {i} + {i}?", "completion": str(v)} for i in range(50) for v in (2 * i, 2 * i + 1)]
    metrics, _ = _prepare(tmp_path, seed=1, sft=_jsonl(tmp_path / "short.jsonl", short))
    assert metrics["sft/near_duplicates_removed"] == 0


def test_near_dedup_threshold_and_library_version_are_in_the_cache_key():
    from tasks.machinery.cachekeys import library_versions, stage_cache_key

    assert library_versions()["rensa"] != "absent" and "ahocorasick-rs" in library_versions()
    a = DataConfig(sft=DatasetSource(source="a.jsonl")).model_dump(mode="json")
    b = DataConfig(sft=DatasetSource(source="a.jsonl"), near_dedup={"threshold": 0.9}).model_dump(mode="json")
    assert stage_cache_key("prepare_data", a, {}, 0) != stage_cache_key("prepare_data", b, {}, 0)


def test_training_rows_holding_an_eval_prompt_are_removed(tmp_path):
    question = "Which planet in our solar system has the most moons?"  # ten words: no 13-gram exists
    long_q = " ".join(f"token{i}" for i in range(30))
    evals = _jsonl(tmp_path / "eval.jsonl", [{"prompt": question, "reference": "Saturn"}, {"prompt": long_q},
                                             {"prompt": "Hi there"}])
    train = [{"prompt": f"Tell me fact {i}.", "completion": f"Fact {i}."} for i in range(40)]
    train[5] = {"prompt": "Quiz: which planet in our solar system has the most moons? Answer briefly.",
                "completion": "Saturn."}
    train[9] = {"prompt": "Copy: " + " ".join(long_q.split()[5:18]), "completion": "ok"}  # one 13-gram of it
    train[12] = {"prompt": "Hi there!", "completion": "Hello."}  # equal to a short eval prompt
    train[13] = {"prompt": "Say hi there to the class", "completion": "Hi there, class."}  # contains it: kept
    metrics, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "t.jsonl", train), eval=evals)
    assert metrics["sft/contaminated_removed"] == 3
    assert {r["row"] for r in _all_rows(out, "sft")} == set(range(1, 41)) - {6, 10, 13}
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    assert {r["row"] for r in removed if r["reason"] == "contaminated_removed"} == {6, 10, 13}


def test_benchmark_files_named_by_the_recipe_are_kept_out(tmp_path):
    bench = _jsonl(tmp_path / "gsm.jsonl", [{"question": "A farmer has 17 sheep and all but 9 run away, how many remain?"}])
    train = [{"prompt": f"Tell me fact {i}.", "completion": f"Fact {i}."} for i in range(20)]
    train.append({"prompt": "a farmer has 17 sheep and all but 9 run away how many remain", "completion": "9"})
    settings = {"decontaminate": {"benchmarks": [{"source": bench, "columns": {"question": "prompt"}}]}}
    metrics, _ = _prepare(tmp_path, sft=_jsonl(tmp_path / "t.jsonl", train), settings=settings)
    assert metrics["sft/contaminated_removed"] == 1
    metrics, _ = _prepare(tmp_path, seed=1, sft=_jsonl(tmp_path / "t.jsonl", train),
                          settings={**settings, "decontaminate": {**settings["decontaminate"], "enabled": False}})
    assert metrics["sft/contaminated_removed"] == 0


# ---- fingerprints ------------------------------------------------------------------------------


def test_a_local_fingerprint_is_computed_once_per_content_change(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    path = tmp_path / "sft.jsonl"
    _jsonl(path, SFT)
    written = path.stat().st_mtime_ns - 10**10  # written ten seconds ago: a stamp taken now is not racy
    os.utime(path, ns=(written, written))
    before = fingerprint(DatasetSource(source=str(path)))["digest"]
    stat = path.stat()
    # same size and modification time: the remembered digest is used, the file is not read again
    path.write_text(path.read_text().replace("q49", "Q49"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(DatasetSource(source=str(path)))["digest"] == before
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint(DatasetSource(source=str(path)))["digest"] != before


def test_an_object_store_fingerprint_is_its_etag(tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k",
                           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="data", Key="sft.jsonl", Body=b'{"prompt": "a", "completion": "b"}\n')
        src = DatasetSource(source="s3://data/sft.jsonl")
        first = fingerprint(src)["digest"]
        assert fingerprint(src)["digest"] == first
        s3.put_object(Bucket="data", Key="sft.jsonl", Body=b'{"prompt": "a", "completion": "c"}\n')
        s3fs.S3FileSystem.clear_instance_cache()
        assert fingerprint(src)["digest"] != first
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_a_hub_data_set_is_pinned_to_a_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    pinned = fingerprint(DatasetSource(source="hf:org/set", revision=commit))
    assert pinned["revision"] == commit
    # offline, a branch resolves through the local Hub cache's refs; unknown: not pinned (None), no error
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "datasets--org--set" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    assert fingerprint(DatasetSource(source="hf:org/set"))["revision"] == commit
    unknown = fingerprint(DatasetSource(source="hf:org/other"))
    assert unknown["revision"] is None


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
    assert {"Hmm.", "?", "I don't know."} <= rejected and {str(n) for n in range(19)} <= rejected
    # The corpus holds training questions and counting runs only: never a question with its answer.
    questions = {r["prompt"] for r in synthetic.generate("sft")}
    for row in synthetic.generate("corpus"):
        text = row["text"]
        numbers = [int(t) for t in text.split()] if all(t.isdigit() for t in text.split()) else []
        is_count = bool(numbers) and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert text in questions or is_count, text


def test_rows_are_written_to_arrow_as_from_pylist_writes_them():
    """The data stage builds its Parquet parts column by column (rows_table); the table must be the one
    pyarrow's from_pylist makes, tool calls, weights and missing values included."""
    import pyarrow as pa

    from tasks.machinery.splits import rows_table, schema

    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    rows = [normalize("sft", {"messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "2+2?"},
                                           {"role": "assistant", "content": "", "tool_calls": [call]},
                                           {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "add"},
                                           {"role": "assistant", "content": "4", "weight": 1}],
                              "tools": [{"type": "function", "function": {"name": "add"}}]}, "row 1"),
            normalize("sft", {"prompt": "hi", "completion": "hello"}, "row 2")]
    for number, row in enumerate(rows):
        row["task"], row["source"], row["row"] = "t", 0, number
    rows.append({"prompt": None, "completion": [], "tools": None, "task": None, "source": None, "row": 9})
    for kind_rows, kind in ((rows, "sft"), ([{"text": "a"}, {"text": None}], "text")):
        expected = pa.Table.from_pylist(kind_rows, schema=schema(kind))
        built = rows_table(kind_rows, schema(kind))
        assert built.equals(expected) and built.to_pylist() == expected.to_pylist()
