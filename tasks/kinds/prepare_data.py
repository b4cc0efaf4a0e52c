"""`prepare_data` stage: read, normalize, filter, deduplicate, decontaminate, mix and split the data sets.

Each data kind (sft, preference, unpaired, eval, text) takes one source or a list of sources (a
mixture); tasks/machinery/sources.py reads them, tasks/blocks/shapes.py maps the public data sets' shapes onto canonical
chat rows, tasks/blocks/dedup.py finds duplicates and contamination. Sources stream in batches: no source is
held whole in Python objects. Batches are worked on by a pool of processes (`workers`), each writing a
columnar part; the decisions that need every row (exact and near duplicates, sampling, the split) are
taken once over compact per-row arrays, and a second pass over the parts writes the output:

  <kind>/train-00000.parquet ...   training rows (`eval` kind: test-*.parquet), loaded by `load_split`
  <kind>/eval-00000.parquet ...    the held-out fraction of a training kind
  stats.json                       every count (also the stage's MLflow metrics), the resolved mixture, and
                                   the boilerplate left out of decontamination and near-duplicate checks
  removed.jsonl                    a sample of the removed rows, with the reason and the row number
  near_duplicates.jsonl            every near-duplicate removal: the row, the kept row it duplicates and
                                   their Jaccard similarity (a sample of it is logged to MLflow)

Every row keeps `task` (its source's tag), `source` (index in the kind's source list) and `row` (its row
number there): the resolved mixture, row by row, is part of the output.

Order of the filters, per kind: rows that teach nothing (too long; a preference pair whose chosen equals
rejected; an empty or whitespace reply; a demonstration whose every reply has weight 0) -> contaminated rows
(training kinds: holding an evaluation n-gram that is not boilerplate) -> exact duplicates (keep the first)
-> near duplicates (verified: Jaccard similarity to an earlier kept row at or above the threshold) ->
sampling by weight -> split. tasks/blocks/dedup.py says how candidates are found and what boilerplate is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.machinery.stagekind import StageKind
from tasks.blocks.data_batches import (BATCH_REASONS, BOILERPLATE_MIN_ROWS, REASONS, SAMPLES_PER_REASON,
                                       TRAINING_KINDS, BatchJob, BatchPool, read_part, uniform, worker_count,
                                       row_text, write_splits)
from tasks.blocks.near_duplicates import NearDuplicates
from tasks.blocks.shapes import DataError, normalize, prompt_text
from tasks.machinery.sources import DatasetSource
from tasks.machinery.splits import schema, split_files
from tasks.machinery.training import Section

logger = logging.getLogger("posttrain")
KINDS = ("sft", "preference", "unpaired", "eval", "text")


Sources = DatasetSource | list[DatasetSource] | None


class NearDedupSettings(Section):
    enabled: bool = Field(True, description="Drop near-duplicate rows: MinHash LSH over word shingles proposes "
                          "candidates, the exact Jaccard similarity of their shingle sets decides.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity of word-shingle sets at or above which a "
                             "row duplicates an earlier kept row (LSH bands are chosen to propose such pairs).")
    compare: list[Literal["system", "user", "assistant", "tool"]] = Field(
        ["user", "assistant"], min_length=1, description="The turns whose text is compared (a `text` row: its "
        "text). System prompts are left out by default: rows share them by construction.")
    boilerplate_fraction: float | None = Field(
        0.1, gt=0, le=1, description="Shingles held by at least this fraction of a kind's rows (and by at least 20 "
        "rows) are boilerplate — a template's fixed text, a shared preamble — and left out of the comparison; "
        "they are counted in stats.json. Counted per batch of rows where at least 1% of the batch holds them, so the "
        "fraction is measured to within a percentage point. null: compare every shingle.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle: int = Field(3, ge=1, le=16, description="Words per shingle.")
    min_words: int = Field(
        20, ge=1, description="Rows with fewer words are left to exact dedup: in a short row one word is the whole "
        "difference ('2 + 2 = 4' and '2 + 2 = 5'), which word shingles cannot weigh.")


class DecontaminationSettings(Section):
    enabled: bool = Field(True, description="Drop training rows that contain an evaluation prompt (the eval data "
                          "set and every benchmark file).")
    boilerplate_fraction: float | None = Field(
        0.05, gt=0, le=1, description="An evaluation n-gram that at least this fraction of a kind's training rows "
        "hold (and at least 10 of them) is shared text — an instruction every row repeats — not evidence that a "
        "row saw the benchmark: it is reported in stats.json and the log, and does not drop rows. null: every "
        "evaluation n-gram convicts.")
    benchmarks: list[DatasetSource] = Field(
        default_factory=list, description="More evaluation sets to keep out of training (their `prompt`, or a "
        "conversation's user turns; `columns` renames, e.g. {question: prompt}).")
    ngram: int = Field(13, ge=1, description="n of the n-gram rule; a prompt shorter than n words must appear whole.")
    min_words: int = Field(4, ge=1, description="Prompts with fewer words are matched only against an equal training "
                           "prompt (a two-word n-gram would match everything).")


class DataConfig(Section):
    sft: Sources = Field(None, description="Demonstrations: prompt/completion, chat `messages`, alpaca, ShareGPT.")
    preference: Sources = Field(None, description="Preference pairs: prompt, chosen, rejected (explicit or implicit "
                                "prompt).")
    unpaired: Sources = Field(None, description="Unpaired feedback: prompt, completion, label (bool).")
    eval: Sources = Field(None, description="Held-out prompts for the evaluate stage, with an optional `reference`.")
    text: Sources = Field(None, description="Plain `text` documents for (continued) pretraining.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of each training set held out.")
    max_chars: int = Field(4000, ge=1, description="Drop chat rows whose prompt plus replies are longer (characters).")
    dedup: bool = Field(True, description="Drop exact duplicate rows (after normalization).")
    near_dedup: NearDedupSettings = Field(default_factory=NearDedupSettings, description="Near-duplicate removal.")
    decontaminate: DecontaminationSettings = Field(
        default_factory=DecontaminationSettings, description="Keep evaluation prompts out of training data.")
    min_rows: int = Field(1, ge=1, description="Refuse a training kind whose train split ends up with fewer rows "
                          "(after filtering, dedup and decontamination), with the counts.")
    min_kept_fraction: float = Field(
        0.05, ge=0, le=1, description="Refuse a training kind that keeps less than this fraction of the rows it read "
        "(a set that deduplicates to almost nothing), with the counts.")
    workers: int = Field(0, ge=0, description="Processes that normalize and hash rows (0 = one per CPU core, at "
                         "most 8); a source of one batch is done in the stage's own process.")
    batch_rows: int = Field(2_000, ge=1, description="Rows per unit of work handed to a worker (memory in flight "
                            "is about 4 x workers x batch_rows rows).")
    shard_rows: int = Field(200_000, ge=1, description="Rows per output Parquet shard.")

    def sources(self) -> dict[str, list[DatasetSource]]:
        found = {kind: getattr(self, kind) for kind in KINDS}
        return {kind: v if isinstance(v, list) else [v] for kind, v in found.items() if v}

    def named_sources(self) -> dict[str, DatasetSource]:
        """Everything the stage reads, by input name: "<kind>.<index>" and "benchmark.<index>"."""
        named = {f"{kind}.{i}": src for kind, sources in self.sources().items() for i, src in enumerate(sources)}
        benchmarks = self.decontaminate.benchmarks if self.decontaminate.enabled else []
        return named | {f"benchmark.{i}": src for i, src in enumerate(benchmarks)}


def prepare_data(cfg: DataConfig, out: Path, seed: int, revisions: dict[str, str] | None = None) -> dict[str, float]:
    """Write the prepared kinds (see the module docstring) into `out`; returns the flat stats as metrics.
    `revisions` pins Hub sources (by "<kind>.<index>") to the commits their fingerprints resolved."""
    from tasks.blocks.dedup import lsh_shape
    from tasks.machinery.sources import read_batches

    if not cfg.sources():
        raise DataError("data: no data set configured (set data.sft, data.preference, data.unpaired, data.eval or "
                        "data.text)")
    revisions = revisions or {}
    near = None
    if cfg.near_dedup.enabled:
        bands, rows = lsh_shape(cfg.near_dedup.threshold, cfg.near_dedup.num_perm)
        near = {"num_perm": cfg.near_dedup.num_perm, "bands": bands, "rows": rows, "shingle": cfg.near_dedup.shingle,
                "min_words": cfg.near_dedup.min_words, "compare": list(cfg.near_dedup.compare)}
    settings = {"max_chars": cfg.max_chars, "near": near, "seed": seed}
    scratch = out / ".parts"
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "near_duplicates.jsonl").write_text("")
    sources = cfg.sources()
    order = [k for k in ("eval", *TRAINING_KINDS) if k in sources]
    stats: dict[str, dict] = {}
    removed: list[dict] = []
    prompts: list[str] = []
    pool = None
    try:
        for kind in order:
            if kind != "eval" and pool is None:
                if cfg.decontaminate.enabled:
                    prompts += _benchmark_prompts(cfg.decontaminate.benchmarks)
                init = (prompts if cfg.decontaminate.enabled else [], cfg.decontaminate.ngram,
                        cfg.decontaminate.min_words)
                pool = BatchPool(worker_count(cfg.workers), init)
            runner = pool or BatchPool(1, ([], 13, 4))

            def jobs(kind=kind):
                part = 0
                for index, src in enumerate(sources[kind]):
                    src_dict = {"source": src.source, "tag": src.tag(), "columns": src.columns}
                    for batch in read_batches(src, revisions.get(f"{kind}.{index}"), cfg.batch_rows,
                                              raw_lines=True):
                        yield BatchJob(kind, index, src_dict, batch, str(scratch / f"{kind}-{part:06d}.arrow"),
                                   settings)
                        part += 1

            stats[kind], kind_prompts = _prepare_kind(kind, sources[kind], runner.map(jobs()), cfg, out, seed,
                                                      removed, near, runner)
            if kind == "eval":
                prompts += kind_prompts
        os.replace(scratch / "near_duplicates.jsonl", out / "near_duplicates.jsonl")
    finally:
        if pool is not None:
            pool.close()
        shutil.rmtree(scratch, ignore_errors=True)
    with open(out / "removed.jsonl", "w", encoding="utf-8") as f:
        for sample in removed:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return flat_metrics(stats)


def flat_metrics(stats: dict) -> dict[str, float]:
    from tasks.machinery.tracking import sanitize_metric_name

    metrics = {}
    for kind, s in stats.items():
        for key, value in s.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{kind}/{key}"] = float(value)
        for task, share in s.get("mixture_shares", {}).items():
            metrics[f"{kind}/mix/{sanitize_metric_name(task)}"] = float(share)
    return metrics


def _benchmark_prompts(benchmarks: list[DatasetSource]) -> list[str]:
    from tasks.machinery.sources import read_batches

    prompts = []
    for bench in benchmarks:
        for batch in read_batches(bench):
            for number, record in batch:
                prompts.append(prompt_text(normalize("eval", record, f"{bench.source}: row {number}")))
    return prompts


class _Gathered:
    """What the batches of one kind report, gathered in reading order: counts (per kind and per source),
    the first removed row numbers, and the per-row arrays the whole-kind decisions are taken on."""

    def __init__(self, kind: str, sources: list[DatasetSource], removed: list[dict]):
        self.kind, self.removed = kind, removed
        self.totals = dict.fromkeys(("rows_read", *REASONS, "multi_turn_rows", "context_turn_rows", "tool_rows"), 0)
        self.per_source = [{"source": s.source, "task": s.tag(), "weight": s.weight,
                            **dict.fromkeys(("rows_read", *REASONS), 0)} for s in sources]
        self.first_rows: dict[str, list[int]] = {reason: [] for reason in REASONS}
        self.parts, self.prompts, self.chars, self.hits, self.frequent = [], [], 0, [], []
        self._keys, self._numbers, self._sources, self.bands = [], [], [], []
        self.rows = self.near_rows = 0

    def add(self, result: dict) -> None:
        for k in self.totals:
            self.totals[k] += result["counts"].get(k, 0)
        for k in self.per_source[result["source"]]:
            if k in BATCH_REASONS or k == "rows_read":
                self.per_source[result["source"]][k] += result["counts"][k]
        for reason, rows in result["first_rows"].items():
            self.first_rows[reason] = (self.first_rows[reason] + rows)[:10]
        for sample in result["samples"]:
            alike = sum(r["reason"] == sample["reason"] and r["kind"] == self.kind for r in self.removed)
            if alike < SAMPLES_PER_REASON:
                self.removed.append(sample)
        self.chars += result["chars"]
        self.prompts += result["prompts"]
        self.hits += [(self.rows + index, found) for index, found in result["hits"]]
        self.near_rows += result.get("near_rows", 0)
        if result["frequent_shingles"] is not None:
            self.frequent.append(result["frequent_shingles"])
        if result["part"]:
            self.parts.append((result["part"], len(result["keys"])))
            self._keys.append(result["keys"])
            self._numbers.append(result["numbers"])
            self._sources.append(np.full(len(result["keys"]), result["source"], dtype=np.int32))
            if result["bands"] is not None:
                self.bands.append(result["bands"])
            self.rows += len(result["keys"])

    def arrays(self):
        """(exact keys, row numbers, source indices), one entry per row that passed the batch filters."""
        join = lambda chunks, dtype: np.concatenate(chunks) if chunks else np.zeros(0, dtype)  # noqa: E731
        return join(self._keys, np.uint64), join(self._numbers, np.int64), join(self._sources, np.int32)

    def rows_at(self, indices) -> dict[int, dict]:
        """The stored rows at these indices (reading order), for samples."""
        wanted, found, start = sorted(set(int(i) for i in indices)), {}, 0
        for path, length in self.parts:
            mine = [i for i in wanted if start <= i < start + length]
            if mine:
                table = read_part(path)
                for i in mine:
                    found[i] = table.slice(i - start, 1).to_pylist()[0]
            start += length
        return found


def _contamination(gathered: _Gathered, cfg: DataConfig) -> tuple[np.ndarray, dict[int, str], list[dict]]:
    """(mask of contaminated rows, the n-gram that convicts each, the boilerplate n-grams with their row
    counts): an evaluation n-gram held by many training rows is shared text, not evidence."""
    from collections import Counter

    held = Counter(ngram for _, found in gathered.hits for ngram in found)
    fraction = cfg.decontaminate.boilerplate_fraction
    floor = max(fraction * gathered.rows, BOILERPLATE_MIN_ROWS["contamination"]) if fraction else float("inf")
    shared = {ngram for ngram, rows in held.items() if rows >= floor}
    contaminated, evidence = np.zeros(gathered.rows, dtype=bool), {}
    for index, found in gathered.hits:
        convicting = next((ngram for ngram in found if ngram not in shared), None)
        if convicting is not None:
            contaminated[index], evidence[index] = True, convicting
    boilerplate = [{"ngram": ngram, "rows": held[ngram]} for ngram in sorted(shared, key=lambda g: -held[g])]
    return contaminated, evidence, boilerplate


def _first_occurrences(keys: np.ndarray, keep: np.ndarray, exact: bool) -> tuple[np.ndarray, int]:
    """(keep mask, exact duplicates): a row is kept when no earlier kept row equals it."""
    keep = keep.copy()
    if exact and keep.any():
        candidates = np.flatnonzero(keep)
        firsts = candidates[np.unique(keys[candidates], return_index=True)[1]]
        keep[:] = False
        keep[firsts] = True
        return keep, int(len(candidates) - len(firsts))
    return keep, 0


def _copies(keep: np.ndarray, source_of: np.ndarray, numbers: np.ndarray, sources: list[DatasetSource],
            seed: int) -> np.ndarray:
    """How many times each row goes into the mix: its source's weight, the fraction sampled by (seed,
    source, row number), so a source's draw does not depend on the other sources."""
    copies = keep.astype(np.int64)
    for index, src in enumerate(sources):
        if src.weight != 1.0:
            mine = keep & (source_of == index)
            u = uniform(numbers[mine].astype(np.uint64), seed * 1_000_003 + index + 1)
            copies[mine] = np.floor(src.weight).astype(np.int64) + (u < src.weight % 1.0)
    return copies


def _prepare_kind(kind, sources, results, cfg: DataConfig, out: Path, seed: int, removed: list,
                  near: dict | None, pool: "BatchPool") -> tuple[dict, list]:
    gathered = _Gathered(kind, sources, removed)
    for result in results:
        gathered.add(result)
    totals = gathered.totals
    if totals["rows_read"] == 0:
        raise DataError(f"{', '.join(s.source for s in sources)}: the data set is empty")
    keys, numbers, source_of = gathered.arrays()
    contaminated, evidence, shared_ngrams = _contamination(gathered, cfg)
    _count_removed(gathered, "contaminated_removed", np.flatnonzero(contaminated), source_of, numbers,
                   lambda i: f"contains {evidence[i]!r}")
    keep, duplicates = _first_occurrences(keys, ~contaminated, cfg.dedup)
    near_removed, finder = 0, None
    if near and kind != "eval" and keep.any():
        finder = NearDuplicates(gathered, near, cfg.near_dedup.threshold, cfg.near_dedup.boilerplate_fraction, seed,
                                pool)
        duplicate = finder.remove(keep)
        keep &= ~duplicate
        near_removed = int(duplicate.sum())
        _record_near_duplicates(gathered, finder, out, source_of, numbers)
    copies = _copies(keep, source_of, numbers, sources, seed)
    if kind == "eval":
        splits = {"test": copies}
    else:  # by a hash of the row itself: a row stays in its split when other rows are added or removed
        held_out = uniform(keys, seed) < cfg.eval_fraction
        splits = {"train": np.where(held_out, 0, copies), "eval": np.where(held_out, copies, 0)}
    counts = {split: int(c.sum()) for split, c in splits.items()}
    reasons = (f"{totals['rows_read']} read, {totals['too_long_removed']} longer than data.max_chars={cfg.max_chars}, "
               f"{totals['identical_pairs_removed']} pairs with chosen == rejected, {totals['empty_replies_removed']} "
               f"with an empty reply, {totals['untrained_rows_removed']} with every reply at weight 0, "
               f"{totals['contaminated_removed']} contaminated, {duplicates} exact and {near_removed} near duplicates")
    main_split = "test" if kind == "eval" else "train"
    if counts[main_split] == 0 and int(copies.sum()) > 0:
        raise DataError(f"{kind}: every row went to the eval split; lower data.eval_fraction ({reasons})")
    minimum = 1 if kind == "eval" else cfg.min_rows
    if counts[main_split] < minimum:
        raise DataError(f"{kind} ({', '.join(s.source for s in sources)}): {counts[main_split]} {main_split} rows "
                        f"left, fewer than data.min_rows={minimum} ({reasons})")
    kept = int(keep.sum())
    if kind != "eval" and kept < cfg.min_kept_fraction * totals["rows_read"]:
        raise DataError(f"{kind} ({', '.join(s.source for s in sources)}): {kept} of {totals['rows_read']} rows read "
                        f"kept ({kept / totals['rows_read']:.1%}), less than data.min_kept_fraction="
                        f"{cfg.min_kept_fraction} ({reasons})")
    write_splits(out / kind, gathered.parts, splits, cfg.shard_rows,
                 schema(kind, tools=totals["tool_rows"] > 0, weights=totals["context_turn_rows"] > 0), pool)

    shares: dict[str, float] = {}
    for index, s in enumerate(gathered.per_source):
        s["rows_kept"], s["rows_in_mix"] = int(keep[source_of == index].sum()), int(copies[source_of == index].sum())
        shares[s["task"]] = shares.get(s["task"], 0.0) + s["rows_in_mix"] / max(1, int(copies.sum()))
    stats = {**totals, "duplicates_removed": duplicates, "near_duplicates_removed": near_removed,
             **{f"{split}_rows": c for split, c in counts.items()}, "mean_chars": gathered.chars / max(1, len(keys)),
             "first_rows_removed": gathered.first_rows, "sources": gathered.per_source, "mixture_shares": shares}
    if kind != "eval" and cfg.decontaminate.enabled:
        stats["contamination_boilerplate_ngrams"] = len(shared_ngrams)
        stats["contamination_boilerplate"] = shared_ngrams[:20]
    if finder is not None:
        stats["near_duplicate_candidates"] = finder.candidates
        stats["near_dedup_boilerplate_shingles"] = int(len(finder.boilerplate))
    _log_kind(kind, reasons, counts, gathered.first_rows, removed)
    for item in shared_ngrams[:3]:
        logger.info("[prepare_data] %s: the evaluation n-gram %r is held by %d training rows: boilerplate, not "
                    "contamination (data.decontaminate.boilerplate_fraction=%s)", kind, item["ngram"], item["rows"],
                    cfg.decontaminate.boilerplate_fraction)
    return stats, gathered.prompts


def _count_removed(gathered: _Gathered, reason: str, indices: np.ndarray, source_of: np.ndarray, numbers: np.ndarray,
                   detail, partner=None) -> None:
    """Counts, first row numbers and samples (with their text) of rows a whole-kind decision removed."""
    gathered.totals[reason] = gathered.totals.get(reason, 0) + len(indices)
    for index, per_source in enumerate(gathered.per_source):
        per_source[reason] = per_source.get(reason, 0) + int((source_of[indices] == index).sum())
    gathered.first_rows[reason] = [int(numbers[i]) for i in indices[:10]]
    sampled = [int(i) for i in indices[:SAMPLES_PER_REASON]]
    stored = gathered.rows_at(sampled + [partner(i) for i in sampled] if partner else sampled)
    for i in sampled:
        sample = {"reason": reason, "kind": gathered.kind, "source": gathered.per_source[source_of[i]]["source"],
                  "row": int(numbers[i]), "detail": detail(i), "text": row_text(stored[i])[:300]}
        if partner:
            sample["duplicate_of_text"] = row_text(stored[partner(i)])[:300]
        gathered.removed.append(sample)


def _record_near_duplicates(gathered: _Gathered, finder: NearDuplicates, out: Path, source_of: np.ndarray,
                            numbers: np.ndarray) -> None:
    """Every near-duplicate removal into near_duplicates.jsonl; counts and a sample (both texts) as for the other
    reasons."""
    records = sorted(finder.records)
    where = lambda i: {"task": gathered.per_source[source_of[i]]["task"],  # noqa: E731
                       "source": gathered.per_source[source_of[i]]["source"], "row": int(numbers[i])}
    with open(out / ".parts" / "near_duplicates.jsonl", "a", encoding="utf-8") as f:
        for removed_row, kept_row, similarity in records:
            f.write(json.dumps({"kind": gathered.kind, **where(removed_row), "duplicate_of": where(kept_row),
                                "similarity": round(similarity, 4)}, ensure_ascii=False) + "\n")
    partner = {r: (k, sim) for r, k, sim in records}
    indices = np.array([r for r, _, _ in records], dtype=np.int64)
    _count_removed(gathered, "near_duplicates_removed", indices, source_of, numbers,
                   lambda i: f"Jaccard {partner[i][1]:.3f} with row {int(numbers[partner[i][0]])} of "
                   f"{gathered.per_source[source_of[partner[i][0]]]['source']}", partner=lambda i: partner[i][0])


def _log_kind(kind: str, reasons: str, counts: dict, first_rows: dict, removed: list[dict]) -> None:
    logger.info("[prepare_data] %s: %s; %s", kind, reasons, ", ".join(f"{split} {c}" for split, c in counts.items()))
    for reason, rows in first_rows.items():
        if rows:
            example = next((x for x in removed if x["kind"] == kind and x["reason"] == reason), None)
            shown = f"; e.g. row {example['row']} ({example['detail']}): {example['text'][:80]!r}" if example else ""
            logger.info("[prepare_data] %s: %s at rows %s%s", kind, reason.replace("_", " "),
                        ", ".join(map(str, rows)), shown)


# ---- reading prepared data -------------------------------------------------------------------


# ---- stage kind ------------------------------------------------------------------------------


def _work(cfg: DataConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks.machinery import tracking

    revisions = {name: ref["revision"] for name, ref in inputs.items() if isinstance(ref, dict) and ref.get("revision")}
    metrics = prepare_data(cfg, out, ctx.seed, revisions)
    stats = json.loads((out / "stats.json").read_text())
    for kind, kind_stats in stats.items():
        for split in ("train", "eval", "test"):
            files = split_files(out, kind, split)
            if files:
                tracking.log_dataset(ctx.env.tracking_uri, ctx.run_id, files, f"{kind}-{split}",
                                     kind_stats[f"{split}_rows"], context=split)
    for name in ("stats.json", "removed.jsonl"):
        tracking.log_artifact(ctx.env.tracking_uri, ctx.run_id, out / name, "data")
    return metrics


def source_refs(cfg: DataConfig, tracking_uri: str | None = None) -> dict[str, dict]:
    """The recipe's data sources as stage inputs ("<kind>.<index>"): their fingerprints key the stage, and a
    Hub data set's resolved commit travels with them so the run reads exactly that commit."""
    from tasks.machinery.sources import fingerprint

    return {name: {"uri": src.source, **fingerprint(src), "kind": "source"}
            for name, src in cfg.named_sources().items()}


KIND = StageKind(
    name="prepare_data",
    description="Read, normalize, filter, deduplicate (exact and near), decontaminate, mix and split the data sets "
    "it names.",
    config=DataConfig,
    inputs={},
    output="data",
    work=_work,
    headline=("sft/train_rows", "preference/train_rows", "unpaired/train_rows", "eval/test_rows", "text/train_rows"),
    provides=lambda cfg: set(cfg.sources()),
    source_inputs=source_refs,
)
