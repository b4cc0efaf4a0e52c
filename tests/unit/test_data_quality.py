"""Data that keeps what it should and trains nothing it shouldn't: verified and recorded near duplicates,
decontamination that tells contamination from boilerplate, and the public data sets' shapes read right
(each written in its own schema)."""

import gzip
import json
import random

import pyarrow.parquet as pq
import pytest

from tasks.blocks import dedup
from tasks.kinds.prepare_data import DataConfig, DataError, DatasetSource, prepare_data, split_files
from tasks.blocks.shapes import normalize


def _jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepare(tmp_path, name="out", settings=None, **sources):
    cfg = DataConfig(**{k: v if isinstance(v, (list, DatasetSource)) else DatasetSource(source=v)
                        for k, v in sources.items()}, **{"eval_fraction": 0.0, **(settings or {})})
    out = tmp_path / name
    out.mkdir()
    return prepare_data(cfg, out, 0), out


def _rows(out, kind, split="train"):
    return [r for f in split_files(out, kind, split) for r in pq.read_table(f).to_pylist()]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


VOCAB = [f"w{i}" for i in range(5000)]


def _words(rng, n):
    return " ".join(rng.choices(VOCAB, k=n))


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


# ---- near duplicates: proposed by LSH, verified, recorded ------------------------------------------


def test_rows_behind_a_long_shared_system_prompt_are_all_kept(tmp_path):
    rng = random.Random(0)
    system = _words(rng, 1000)
    rows = [{"messages": [msg("system", system), msg("user", _words(rng, 12) + "?"), msg("assistant", _words(rng, 20))]}
            for _ in range(2000)]
    metrics, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "sys.jsonl", rows), settings={"max_chars": 20000})
    assert metrics["sft/near_duplicates_removed"] == 0 and metrics["sft/train_rows"] == 2000
    assert (out / "near_duplicates.jsonl").read_text() == ""


def test_similarity_below_the_threshold_is_verified_and_kept(tmp_path):
    """With the system prompt compared, rows share ~71% of their shingles: LSH proposes them, the exact
    Jaccard similarity (below 0.8) keeps them."""
    rng = random.Random(1)
    system = _words(rng, 300)
    rows = [{"messages": [msg("system", system), msg("user", _words(rng, 20) + "?"), msg("assistant", _words(rng, 40))]}
            for _ in range(500)]
    settings = {"near_dedup": {"compare": ["system", "user", "assistant"], "boilerplate_fraction": None}}
    metrics, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "s.jsonl", rows), settings=settings)
    stats = json.loads((out / "stats.json").read_text())["sft"]
    assert stats["near_duplicate_candidates"] > 1000, "LSH proposes the pairs that share the system prompt"
    assert metrics["sft/near_duplicates_removed"] == 0 and metrics["sft/train_rows"] == 500


def test_a_shared_preamble_is_boilerplate_not_similarity(tmp_path):
    rng = random.Random(2)
    preamble = _words(rng, 200)
    rows = [{"messages": [msg("user", f"{preamble} {_words(rng, 10)}?"), msg("assistant", _words(rng, 10))]}
            for _ in range(300)]
    flat, sizes = dedup.shingle_sets([dedup.words(rows[0]["messages"][0]["content"] + " " + rows[0]["messages"][1]
                                                  ["content"]), dedup.words(rows[1]["messages"][0]["content"] + " " +
                                                                            rows[1]["messages"][1]["content"])], 3)
    whole = dedup.jaccard(flat[: sizes[0]], flat[sizes[0]:])
    assert whole >= 0.8, "compared whole, every row would duplicate the first"
    metrics, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "p.jsonl", rows))
    stats = json.loads((out / "stats.json").read_text())["sft"]
    assert metrics["sft/near_duplicates_removed"] == 0 and metrics["sft/train_rows"] == 300
    assert stats["near_dedup_boilerplate_shingles"] >= 190


def _variant(rng, words, changes):
    out = list(words)
    for i in rng.sample(range(len(out)), changes):
        out[i] = f"x{rng.randrange(10**9)}"
    return out


def test_the_threshold_decides_and_every_removal_is_recorded(tmp_path):
    rng = random.Random(3)
    bases = [[f"b{d}w{i}" for i in range(120)] for d in range(60)]
    variants, similarity = [], []
    for d, words in enumerate(bases):
        v = _variant(rng, words, 1 + d % 12)  # 1..12 words changed: Jaccard ~0.97 .. ~0.7
        flat, sizes = dedup.shingle_sets([["copy", "this"] + words, ["copy", "this"] + v], 3)
        similarity.append(dedup.jaccard(flat[: sizes[0]], flat[sizes[0]:]))
        variants.append(v)
    rows = [{"prompt": "Copy this:", "completion": " ".join(w)} for w in bases + variants]
    metrics, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "pairs.jsonl", rows))
    kept = {r["row"] for r in _rows(out, "sft")}
    for d, sim in enumerate(similarity):
        variant_row = 61 + d
        assert (variant_row in kept) == (sim < 0.8), (d, sim)
    assert min(similarity) < 0.75 and max(similarity) > 0.9
    records = _lines(out / "near_duplicates.jsonl")
    assert len(records) == metrics["sft/near_duplicates_removed"] == sum(s >= 0.8 for s in similarity)
    for record in records:
        d = record["row"] - 61
        assert record["duplicate_of"]["row"] == d + 1 and record["duplicate_of"]["source"].endswith("pairs.jsonl")
        assert record["similarity"] == pytest.approx(similarity[d], abs=1e-4) and record["similarity"] >= 0.8
    samples = [r for r in _lines(out / "removed.jsonl") if r["reason"] == "near_duplicates_removed"]
    assert samples and all(s["text"] and s["duplicate_of_text"] and "Jaccard" in s["detail"] for s in samples)
    assert json.loads((out / "stats.json").read_text())["sft"]["first_rows_removed"]["near_duplicates_removed"]


def test_candidates_are_shaped_for_recall():
    bands, rows = dedup.lsh_shape(0.8, 128)
    proposed = lambda j: 1 - (1 - j ** rows) ** bands  # noqa: E731
    assert proposed(0.8) >= 0.99 and proposed(0.85) > 0.999 and proposed(0.3) < 0.05


# ---- decontamination: contamination, not boilerplate ------------------------------------------------


PREAMBLE = "Think step by step, show your working, and give the final answer on the last line."


def test_a_shared_instruction_is_reported_not_used_to_drop_rows(tmp_path):
    rng = random.Random(4)
    question = ("A baker fills 14 trays with 23 rolls each and sells all but 38 of the rolls by noon on a busy "
                "Saturday, how many rolls did the baker sell before noon?")
    evals = _jsonl(tmp_path / "eval.jsonl", [{"prompt": f"{PREAMBLE} {question}", "reference": "284"}])
    train = [{"prompt": f"{PREAMBLE} {_words(rng, 15)}?", "completion": _words(rng, 8)} for _ in range(300)]
    reworded = ("a baker fills 14 trays with 23 rolls each and sells all but 38 of the rolls by noon on a busy "
                "Sunday - how many did they sell?")
    train[100] = {"prompt": f"{PREAMBLE} {reworded}", "completion": "284"}
    metrics, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "t.jsonl", train), eval=evals)
    assert metrics["sft/contaminated_removed"] == 1, "only the lightly reworded evaluation question is removed"
    assert {r["row"] for r in _rows(out, "sft")} == set(range(1, 301)) - {101}
    stats = json.loads((out / "stats.json").read_text())["sft"]
    assert stats["contamination_boilerplate_ngrams"] >= 1
    assert stats["contamination_boilerplate"][0]["rows"] == 300
    assert all(item["ngram"] in " ".join(dedup.words(PREAMBLE)) for item in stats["contamination_boilerplate"])
    removed = [r for r in _lines(out / "removed.jsonl") if r["reason"] == "contaminated_removed"]
    assert [r["row"] for r in removed] == [101] and "baker" in removed[0]["text"]


def test_a_rare_shared_n_gram_still_convicts(tmp_path):
    """Boilerplate needs a fraction of the rows: a benchmark question copied into a few rows is contamination."""
    question = "In how many different ways can eight identical rooks be placed on a chessboard so none attack?"
    bench = _jsonl(tmp_path / "bench.jsonl", [{"question": question}])
    train = [{"prompt": f"Tell me fact {i}.", "completion": f"Fact {i}."} for i in range(200)]
    for i in (3, 50, 120):
        train[i] = {"prompt": question, "completion": "40320"}
    settings = {"dedup": False, "decontaminate": {"benchmarks": [{"source": bench, "columns": {"question": "prompt"}}]}}
    metrics, _ = _prepare(tmp_path, sft=_jsonl(tmp_path / "t.jsonl", train), settings=settings)
    assert metrics["sft/contaminated_removed"] == 3


# ---- shapes --------------------------------------------------------------------------------------


def _plain(messages):
    return [(m["role"], m["content"]) for m in messages]


def test_hh_rlhf_transcripts_split_into_prompt_and_final_replies(tmp_path):
    rows = [{"chosen": f"\n\nHuman: What is {i} + 1?\n\nAssistant: Do you mean addition?\n\nHuman: Yes.\n\n"
                       f"Assistant: It is {i + 1}.",
             "rejected": f"\n\nHuman: What is {i} + 1?\n\nAssistant: Do you mean addition?\n\nHuman: Yes.\n\n"
                         "Assistant: I don't know."} for i in range(20)]
    rows.append({"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello."})
    metrics, out = _prepare(tmp_path, preference=_jsonl(tmp_path / "hh.jsonl", rows))
    stored = _rows(out, "preference")
    assert len(stored) == 20 and metrics["preference/empty_replies_removed"] == 1
    first = stored[0]
    assert _plain(first["prompt"]) == [("user", "What is 0 + 1?"), ("assistant", "Do you mean addition?"),
                                       ("user", "Yes.")]
    assert _plain(first["chosen"]) == [("assistant", "It is 1.")]
    assert _plain(first["rejected"]) == [("assistant", "I don't know.")]


def test_a_prompt_repeated_inside_chosen_and_rejected_is_stripped():
    hh = {"prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.",
          "rejected": "\n\nHuman: Name a colour.\n\nAssistant: Seven."}
    row = normalize("preference", hh, "hh row 1")
    assert _plain(row["prompt"]) == [("user", "Name a colour.")] and _plain(row["chosen"]) == [("assistant", "Blue.")]
    plain = {"prompt": "Q: Name a colour.\nA:", "chosen": "Q: Name a colour.\nA: Blue.",
             "rejected": "Q: Name a colour.\nA: Seven."}
    row = normalize("preference", plain, "row 1")
    assert _plain(row["chosen"]) == [("assistant", "Blue.")] and _plain(row["rejected"]) == [("assistant", "Seven.")]


def test_openai_weight_zero_turns_are_context(tmp_path):
    rows = [
        {"messages": [msg("system", "Be terse."), msg("user", "Hi"), msg("assistant", "Hey!", weight=0),
                      msg("user", "2+2?"), msg("assistant", "4", weight=1)]},
        {"messages": [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "2+3?"),
                      msg("assistant", "six", weight=0), msg("user", "Sure?"), msg("assistant", "5.")]},
        {"messages": [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "Bye"),
                      msg("assistant", "Later!", weight=0)]},
        {"messages": [msg("user", "Hi"), msg("assistant", "Hello.", weight=0)]},
    ]
    metrics, out = _prepare(tmp_path, sft=_jsonl(tmp_path / "openai.jsonl", rows))
    assert metrics["sft/untrained_rows_removed"] == 1 and metrics["sft/context_turn_rows"] == 1
    stored = {r["row"]: r for r in _rows(out, "sft")}
    assert _plain(stored[1]["prompt"])[-2:] == [("assistant", "Hey!"), ("user", "2+2?")]
    assert _plain(stored[1]["completion"]) == [("assistant", "4")]
    assert [m["weight"] for m in stored[2]["completion"]] == [None, None, 0, None, None]
    assert _plain(stored[3]["completion"]) == [("assistant", "Hello.")], "a trailing weight-0 turn trains nothing"
    with pytest.raises(DataError, match=r"row 1: messages\[1\]: 'weight' must be 0 or 1"):
        normalize("sft", {"messages": [msg("user", "a"), msg("assistant", "b", weight=0.5)]}, "row 1")


def test_empty_replies_are_dropped_and_counted_the_same_way_in_every_shape(tmp_path):
    good = lambda i: f"Answer {i}."  # noqa: E731
    sft_shapes = {
        "completion": lambda i, r: {"prompt": f"Q{i}?", "completion": r},
        "messages": lambda i, r: {"messages": [msg("user", f"Q{i}?"), msg("assistant", r)]},
        "alpaca": lambda i, r: {"instruction": f"Q{i}?", "input": "", "output": r},
        "sharegpt": lambda i, r: {"conversations": [{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": r}]},
    }
    for name, shape in sft_shapes.items():
        rows = [shape(i, good(i) if i % 5 else ("" if i % 10 else "  \n")) for i in range(40)]
        metrics, _ = _prepare(tmp_path, name=name, sft=_jsonl(tmp_path / f"{name}.jsonl", rows))
        assert metrics["sft/empty_replies_removed"] == 8 and metrics["sft/train_rows"] == 32, name
    pref = [{"prompt": f"Q{i}?", "chosen": good(i), "rejected": "" if i % 5 == 0 else "No."} for i in range(40)]
    metrics, _ = _prepare(tmp_path, name="pref", preference=_jsonl(tmp_path / "pref.jsonl", pref))
    assert metrics["preference/empty_replies_removed"] == 8
    conv = [{"chosen": [msg("user", f"Q{i}?"), msg("assistant", good(i))],
             "rejected": [msg("user", f"Q{i}?"), msg("assistant", " " if i % 5 == 0 else "No.")]} for i in range(40)]
    metrics, _ = _prepare(tmp_path, name="conv", preference=_jsonl(tmp_path / "conv.jsonl", conv))
    assert metrics["preference/empty_replies_removed"] == 8
    unpaired = [{"prompt": f"Q{i}?", "completion": "" if i % 5 == 0 else good(i), "label": True} for i in range(40)]
    metrics, _ = _prepare(tmp_path, name="unpaired", unpaired=_jsonl(tmp_path / "u.jsonl", unpaired))
    assert metrics["unpaired/empty_replies_removed"] == 8


SFT = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(30)]


@pytest.mark.parametrize("name, fmt", [("d.jsonl.gz", "auto"), ("d.jsonl.zst", "auto"), ("d.jsonl", "jsonl"),
                                       ("d.data", "jsonl")])
def test_compressed_jsonl_by_extension_or_content(tmp_path, name, fmt):
    import zstandard

    path = tmp_path / name
    payload = "".join(json.dumps(r) + "\n" for r in SFT).encode()
    if name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(payload))
    else:
        path.write_bytes(gzip.compress(payload))
    metrics, out = _prepare(tmp_path, sft=DatasetSource(source=str(path), format=fmt))
    assert metrics["sft/train_rows"] == 30
    assert {r["task"] for r in _rows(out, "sft")} == {"d" if fmt == "auto" else name.removesuffix(".jsonl")}


def test_a_save_to_disk_folder_is_recognized_by_its_files(tmp_path):
    import datasets

    datasets.Dataset.from_list(SFT).save_to_disk(str(tmp_path / "saved"))
    metrics, _ = _prepare(tmp_path, sft=str(tmp_path / "saved"))
    assert metrics["sft/train_rows"] == 30
    (tmp_path / "loose").mkdir()
    _jsonl(tmp_path / "loose" / "part-0.jsonl", SFT)
    with pytest.raises(DataError, match=r"loose: a folder, and not one `datasets.save_to_disk` wrote .* name the data "
                                        r"file itself"):
        _prepare(tmp_path, name="loose-out", sft=str(tmp_path / "loose"))


def test_a_set_that_deduplicates_to_almost_nothing_is_refused_with_the_counts(tmp_path):
    rows = [{"prompt": "What is 2 + 2?", "completion": "4"}] * 200
    with pytest.raises(DataError, match=r"sft \(.*same.jsonl\): 1 of 200 rows read kept \(0.5%\), less than "
                                        r"data.min_kept_fraction=0.05 \(200 read, .* 199 exact and 0 near duplicates\)"):
        _prepare(tmp_path, sft=_jsonl(tmp_path / "same.jsonl", rows))
    assert not list((tmp_path / "out").glob("**/*.parquet"))
