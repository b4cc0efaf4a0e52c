"""`prepare_data` stage: read, normalize, filter, deduplicate, decontaminate, mix and split the data sets.

Each data kind (sft, preference, unpaired, eval, text) takes one source or a list of sources (a
mixture); tasks/sources.py reads them, tasks/shapes.py maps the public data sets' shapes onto canonical
chat rows, tasks/dedup.py finds duplicates and contamination. Sources stream in batches: no source is
held whole in Python objects. Batches are worked on by a pool of processes (`workers`), each writing a
columnar part; the decisions that need every row (exact and near duplicates, sampling, the split) are
taken once over compact per-row arrays, and a second pass over the parts writes the output:

  <kind>/train-00000.parquet ...   training rows (`eval` kind: test-*.parquet), loaded by `load_split`
  <kind>/eval-00000.parquet ...    the held-out fraction of a training kind
  stats.json                       every count (also the stage's MLflow metrics) and the resolved mixture
  removed.jsonl                    a sample of the removed rows, with the reason and the row number

Every row keeps `task` (its source's tag), `source` (index in the kind's source list) and `row` (its row
number there): the resolved mixture, row by row, is part of the output.

Order of the filters, per kind: rows that teach nothing (too long; a preference pair whose chosen equals
rejected) -> contaminated rows (training kinds) -> exact duplicates (keep the first) -> near duplicates
(a row that shares an LSH band with an earlier kept row) -> sampling by weight -> split.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.kinds import StageKind
from tasks.shapes import DataError, Identical, normalize, prompt_text, row_text
from tasks.training import Section

logger = logging.getLogger("posttrain")
KINDS = ("sft", "preference", "unpaired", "eval", "text")
TRAINING_KINDS = ("sft", "preference", "unpaired", "text")
Format = Literal["auto", "jsonl", "json", "parquet", "csv", "hf"]
BOOKKEEPING = ("task", "source", "row")
SAMPLES_PER_REASON = 5


class DatasetSource(Section):
    source: str = Field(description="Path, fsspec URI (s3://...), `hf:<name>` or `synthetic:arithmetic/<part>`.")
    format: Format = Field("auto", description="File format; 'auto' decides by the file extension.")
    split: str = Field("train", description="Split to read when the source is a Hugging Face data set.")
    revision: str | None = Field(
        None, description="Hugging Face data set revision (branch, tag or commit); resolved to a commit that keys the "
        "cache and is recorded with the run. Default: main at the time of the run.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns before normalizing, e.g. {question: prompt}."
    )
    weight: float = Field(
        1.0, gt=0, description="Fraction of this source's rows kept after filtering, sampled with the recipe's seed: "
        "0.25 keeps about a quarter, 2.0 every row twice, 1.5 every row once and about half of them again. It is not "
        "the share of the mix: the shares that result are reported per task in stats.json and MLflow.")
    task: str | None = Field(
        None, description="Task tag every row of this source carries through to evaluation (per-task metrics). "
        "Default: the file or data set name.")

    def tag(self) -> str:
        if self.task:
            return self.task
        name = self.source.removeprefix("hf:").rstrip("/").split("?")[0]
        return re.sub(r"\.(jsonl|ndjson|json|parquet|csv)$", "", name.rsplit("/", 1)[-1]) or name


Sources = DatasetSource | list[DatasetSource] | None


class NearDedupSettings(Section):
    enabled: bool = Field(True, description="Drop near-duplicate rows (MinHash LSH over word shingles).")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity of word-shingle sets above which two "
                             "rows count as near duplicates (LSH bands are chosen for it).")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle: int = Field(3, ge=1, le=16, description="Words per shingle.")
    min_words: int = Field(
        20, ge=1, description="Rows with fewer words are left to exact dedup: in a short row one word is the whole "
        "difference ('2 + 2 = 4' and '2 + 2 = 5'), which word shingles cannot weigh.")


class DecontaminationSettings(Section):
    enabled: bool = Field(True, description="Drop training rows that contain an evaluation prompt (the eval data "
                          "set and every benchmark file).")
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


# ---- per-batch work (in a worker process) ----------------------------------------------------


REASONS = ("too_long_removed", "identical_pairs_removed", "contaminated_removed")


@dataclass
class _Job:
    """Everything a worker needs for one batch; plain data, so it pickles cheaply."""

    kind: str
    source_index: int
    src: dict  # source, tag, columns
    rows: list  # (row number, record or a JSONL line's bytes)
    part: str  # where the batch's kept rows go (Parquet)
    settings: dict


class _Removed:
    """Per reason a row was dropped: the count, the first ten row numbers and a few examples."""

    def __init__(self, kind: str, source: str):
        self.kind, self.source = kind, source
        self.counts = dict.fromkeys(REASONS, 0)
        self.first_rows: dict[str, list[int]] = {reason: [] for reason in REASONS}
        self.samples: list[dict] = []

    def add(self, reason: str, number: int, text: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.first_rows[reason]) < 10:
            self.first_rows[reason].append(number)
        if sum(x["reason"] == reason for x in self.samples) < SAMPLES_PER_REASON:
            self.samples.append({"reason": reason, "kind": self.kind, "source": self.source, "row": number,
                                 "detail": detail, "text": text[:300]})


_CONTAMINATION = None  # this process's evaluation prompts to keep out (set by _set_contamination)


def _set_contamination(prompts: list[str], ngram: int, min_words: int) -> None:
    from tasks.dedup import Contamination

    global _CONTAMINATION
    _CONTAMINATION = Contamination(prompts, ngram, min_words) if prompts else None


def _uses_tools(row: dict) -> bool:
    return bool(row.get("tools")) or any(m["tool_calls"] or m["role"] == "tool"
                                         for field in ("prompt", "completion", "chosen", "rejected")
                                         for m in row.get(field) or ())


def process_batch(job: _Job) -> dict:
    """Normalize one batch, drop what teaches nothing and what is contaminated, hash the rest for the
    duplicate decisions, and write the rows as a Parquet part. Returns counts, samples and per-row arrays."""
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks import dedup
    from tasks.sources import parse_line, rename

    s, near = job.settings, job.settings["near"] if job.kind != "eval" else None
    contamination = _CONTAMINATION if job.kind in TRAINING_KINDS else None
    removed = _Removed(job.kind, job.src["source"])
    counts = {"rows_read": len(job.rows), "multi_turn_rows": 0, "tool_rows": 0}
    kept, numbers, keys, word_lists, long_rows, prompts, chars = [], [], [], [], [], [], 0
    rows = job.rows
    if rows and isinstance(rows[0][1], bytes):
        rows = [(number, parse_line(job.src["source"], number, line)) for number, line in rows]
    for number, record in rename(job.src["columns"], rows):
        try:
            row = normalize(job.kind, record, f"{job.src['source']}: row {number}")
        except Identical:
            removed.add("identical_pairs_removed", number, json.dumps(record, ensure_ascii=False), "chosen == rejected")
            continue
        text = row_text(row)
        if job.kind not in ("eval", "text") and len(text) > s["max_chars"]:
            removed.add("too_long_removed", number, text, f"{len(text)} characters")
            continue
        row_words = dedup.words(text) if (contamination or near) else None
        if contamination is not None:
            prompt_words = dedup.words(prompt_text(row)) if contamination.short and "prompt" in row else None
            hit = contamination.match(row_words, prompt_words)
            if hit is not None:
                removed.add("contaminated_removed", number, text, f"contains {hit!r}")
                continue
        counts["multi_turn_rows"] += job.kind == "sft" and len(row["completion"]) > 1
        counts["tool_rows"] += _uses_tools(row)
        chars += len(text)
        keys.append(dedup.exact_key(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)))
        if job.kind == "eval":
            prompts.append(prompt_text(row))
        if near and len(row_words) >= max(near["min_words"], near["shingle"]):
            word_lists.append(row_words)
            long_rows.append(len(kept))
        row["task"], row["source"], row["row"] = job.src["tag"], job.source_index, number
        kept.append(row)
        numbers.append(number)
    if kept:
        pq.write_table(pa.Table.from_pylist(kept, schema=schema(job.kind)), job.part)
    keys = np.array(keys, dtype=np.uint64)
    bands = None
    if near and kept:
        # rows too short for near dedup get band values of their own (their exact key, mixed per band)
        bands = np.stack([_uniform_bits(keys, band + 1) for band in range(near["bands"])], axis=1)
        if word_lists:
            bands[long_rows] = dedup.band_hashes(word_lists, near["num_perm"], near["bands"], near["rows"],
                                                 near["shingle"], s["seed"])
    return {"counts": {**counts, **removed.counts}, "first_rows": removed.first_rows, "samples": removed.samples,
            "chars": chars, "keys": keys, "numbers": np.array(numbers, dtype=np.int64), "bands": bands,
            "prompts": prompts, "part": job.part if kept else None, "source": job.source_index}


def schema(kind: str, tools: bool = True):
    """A kind's columns; without `tools`, messages are plain {role, content} (what every chat template reads)."""
    import pyarrow as pa

    call = pa.struct([("type", pa.string()),
                      ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())] + (
        [("tool_calls", pa.list_(call)), ("tool_call_id", pa.string()), ("name", pa.string())] if tools else [])))
    fields = {
        "sft": [("prompt", message), ("completion", message), ("tools", pa.string())],
        "preference": [("prompt", message), ("chosen", message), ("rejected", message), ("tools", pa.string())],
        "unpaired": [("prompt", message), ("completion", message), ("label", pa.bool_())],
        "eval": [("prompt", message), ("reference", pa.string())],
        "text": [("text", pa.string())],
    }[kind]
    fields = [f for f in fields if tools or f[0] != "tools"]
    return pa.schema(fields + [("task", pa.string()), ("source", pa.int32()), ("row", pa.int64())])


# ---- the whole-kind decisions and the output ---------------------------------------------------


def _uniform_bits(keys: np.ndarray, salt: int) -> np.ndarray:
    """64 random-looking bits per key, fixed by (key, salt): splitmix64 of both."""
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) ^ np.uint64((salt * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per key, fixed by (key, salt)."""
    return (_uniform_bits(keys, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _Pool:
    """Batches to worker processes with a bounded number in flight (memory stays bounded), results in
    order; a source of a single batch is done in this process."""

    def __init__(self, workers: int, init_args: tuple):
        self.workers, self.init_args, self.executor = workers, init_args, None
        _set_contamination(*init_args)

    def map(self, jobs):
        jobs = iter(jobs)
        first = next(jobs, None)
        if first is None:
            return
        second = next(jobs, None)
        if second is None or self.workers <= 1:
            yield process_batch(first)
            if second is not None:
                yield process_batch(second)
                for job in jobs:
                    yield process_batch(job)
            return
        if self.executor is None:
            import multiprocessing

            # spawned, not forked: rensa computes on a Rust thread pool, which a forked child inherits without
            # its threads (and then waits forever).
            self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_set_contamination, initargs=self.init_args)
        try:
            pending = [self.executor.submit(process_batch, first), self.executor.submit(process_batch, second)]
            for job in jobs:
                if len(pending) >= 2 * self.workers:
                    yield pending.pop(0).result()
                pending.append(self.executor.submit(process_batch, job))
            for future in pending:
                yield future.result()
        except BrokenProcessPool:
            raise RuntimeError(
                "data.workers: the worker processes did not start. A script that runs prepare_data must call it "
                "under `if __name__ == \"__main__\":` (Python's rule for multiprocessing), or set data.workers: 1 "
                "to work in this process") from None

    def close(self):
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


def _workers(cfg: DataConfig) -> int:
    if cfg.workers:
        return cfg.workers
    if not _main_can_be_imported():
        logger.info("[prepare_data] one process: worker processes cannot re-import this program (it is read "
                    "from standard input)")
        return 1
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), 8)


def _main_can_be_imported() -> bool:
    """Whether a spawned worker can set up this program's __main__ (not when it was read from stdin)."""
    import sys

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return path is None or Path(path).exists()


def prepare_data(cfg: DataConfig, out: Path, seed: int, revisions: dict[str, str] | None = None) -> dict[str, float]:
    """Write the prepared kinds (see the module docstring) into `out`; returns the flat stats as metrics.
    `revisions` pins Hub sources (by "<kind>.<index>") to the commits their fingerprints resolved."""
    from tasks.dedup import lsh_shape
    from tasks.sources import read_batches

    if not cfg.sources():
        raise DataError("data: no data set configured (set data.sft, data.preference, data.unpaired, data.eval or "
                        "data.text)")
    revisions = revisions or {}
    near = None
    if cfg.near_dedup.enabled:
        bands, rows = lsh_shape(cfg.near_dedup.threshold, cfg.near_dedup.num_perm)
        near = {"num_perm": cfg.near_dedup.num_perm, "bands": bands, "rows": rows, "shingle": cfg.near_dedup.shingle,
                "min_words": cfg.near_dedup.min_words}
    settings = {"max_chars": cfg.max_chars, "near": near, "seed": seed}
    scratch = out / ".parts"
    scratch.mkdir(parents=True, exist_ok=True)
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
                pool = _Pool(_workers(cfg), init)
            runner = pool or _Pool(1, ([], 13, 4))

            def jobs(kind=kind):
                part = 0
                for index, src in enumerate(sources[kind]):
                    src_dict = {"source": src.source, "tag": src.tag(), "columns": src.columns}
                    for batch in read_batches(src, revisions.get(f"{kind}.{index}"), cfg.batch_rows,
                                              raw_lines=True):
                        yield _Job(kind, index, src_dict, batch, str(scratch / f"{kind}-{part:06d}.parquet"),
                                   settings)
                        part += 1

            stats[kind], kind_prompts = _prepare_kind(kind, sources[kind], runner.map(jobs()), cfg, out, seed,
                                                      removed)
            if kind == "eval":
                prompts += kind_prompts
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
    from tasks.tracking import sanitize_metric_name

    metrics = {}
    for kind, s in stats.items():
        for key, value in s.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{kind}/{key}"] = float(value)
        for task, share in s.get("mixture_shares", {}).items():
            metrics[f"{kind}/mix/{sanitize_metric_name(task)}"] = float(share)
    return metrics


def _benchmark_prompts(benchmarks: list[DatasetSource]) -> list[str]:
    from tasks.sources import read_batches

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
        self.totals = dict.fromkeys(("rows_read", *REASONS, "multi_turn_rows", "tool_rows"), 0)
        self.per_source = [{"source": s.source, "task": s.tag(), "weight": s.weight,
                            **dict.fromkeys(("rows_read", *REASONS), 0)} for s in sources]
        self.first_rows: dict[str, list[int]] = {reason: [] for reason in REASONS}
        self.parts, self.prompts, self.chars = [], [], 0
        self._keys, self._numbers, self._sources, self._bands = [], [], [], []

    def add(self, result: dict) -> None:
        for k in self.totals:
            self.totals[k] += result["counts"][k]
        for k in self.per_source[result["source"]]:
            if k in REASONS or k == "rows_read":
                self.per_source[result["source"]][k] += result["counts"][k]
        for reason, rows in result["first_rows"].items():
            self.first_rows[reason] = (self.first_rows[reason] + rows)[:10]
        for sample in result["samples"]:
            alike = sum(r["reason"] == sample["reason"] and r["kind"] == self.kind for r in self.removed)
            if alike < SAMPLES_PER_REASON:
                self.removed.append(sample)
        self.chars += result["chars"]
        self.prompts += result["prompts"]
        if result["part"]:
            self.parts.append((result["part"], len(result["keys"])))
            self._keys.append(result["keys"])
            self._numbers.append(result["numbers"])
            self._sources.append(np.full(len(result["keys"]), result["source"], dtype=np.int32))
            if result["bands"] is not None:
                self._bands.append(result["bands"])

    def arrays(self):
        """(exact keys, row numbers, source indices, LSH bands or None), one entry per kept row."""
        join = lambda chunks, dtype: np.concatenate(chunks) if chunks else np.zeros(0, dtype)  # noqa: E731
        return (join(self._keys, np.uint64), join(self._numbers, np.int64), join(self._sources, np.int32),
                np.concatenate(self._bands) if self._bands else None)


def _first_occurrences(keys: np.ndarray, bands: np.ndarray | None, exact: bool) -> tuple[np.ndarray, int, int]:
    """(keep mask, exact duplicates, near duplicates): a row is kept when no earlier kept row equals it
    (exact) or shares an LSH band with it (near)."""
    keep = np.ones(len(keys), dtype=bool)
    if exact and len(keys):
        keep[:] = False
        keep[np.unique(keys, return_index=True)[1]] = True
    exact_removed, near_removed = int(len(keys) - keep.sum()), 0
    if bands is not None and keep.any():
        from tasks.dedup import near_duplicates

        candidates = np.flatnonzero(keep)
        near = near_duplicates(bands, candidates)
        keep[candidates[near]] = False
        near_removed = int(near.sum())
    return keep, exact_removed, near_removed


def _copies(keep: np.ndarray, source_of: np.ndarray, numbers: np.ndarray, sources: list[DatasetSource],
            seed: int) -> np.ndarray:
    """How many times each row goes into the mix: its source's weight, the fraction sampled by (seed,
    source, row number), so a source's draw does not depend on the other sources."""
    copies = keep.astype(np.int64)
    for index, src in enumerate(sources):
        if src.weight != 1.0:
            mine = keep & (source_of == index)
            u = _uniform(numbers[mine].astype(np.uint64), seed * 1_000_003 + index + 1)
            copies[mine] = np.floor(src.weight).astype(np.int64) + (u < src.weight % 1.0)
    return copies


def _prepare_kind(kind, sources, results, cfg: DataConfig, out: Path, seed: int, removed: list) -> tuple[dict, list]:
    gathered = _Gathered(kind, sources, removed)
    for result in results:
        gathered.add(result)
    totals = gathered.totals
    if totals["rows_read"] == 0:
        raise DataError(f"{', '.join(s.source for s in sources)}: the data set is empty")
    keys, numbers, source_of, bands = gathered.arrays()
    keep, duplicates, near_removed = _first_occurrences(keys, bands, cfg.dedup)
    copies = _copies(keep, source_of, numbers, sources, seed)
    if kind == "eval":
        splits = {"test": copies}
    else:  # by a hash of the row itself: a row stays in its split when other rows are added or removed
        held_out = _uniform(keys, seed) < cfg.eval_fraction
        splits = {"train": np.where(held_out, 0, copies), "eval": np.where(held_out, copies, 0)}
    counts = {split: int(c.sum()) for split, c in splits.items()}
    reasons = (f"{totals['rows_read']} read, {totals['too_long_removed']} longer than data.max_chars={cfg.max_chars}, "
               f"{totals['identical_pairs_removed']} pairs with chosen == rejected, {totals['contaminated_removed']} "
               f"contaminated, {duplicates} exact and {near_removed} near duplicates")
    main_split = "test" if kind == "eval" else "train"
    if counts[main_split] == 0 and int(copies.sum()) > 0:
        raise DataError(f"{kind}: every row went to the eval split; lower data.eval_fraction ({reasons})")
    minimum = 1 if kind == "eval" else cfg.min_rows
    if counts[main_split] < minimum:
        raise DataError(f"{kind} ({', '.join(s.source for s in sources)}): {counts[main_split]} {main_split} rows "
                        f"left, fewer than data.min_rows={minimum} ({reasons})")
    _write_splits(out / kind, gathered.parts, splits, cfg.shard_rows, schema(kind, tools=totals["tool_rows"] > 0))

    shares: dict[str, float] = {}
    for index, s in enumerate(gathered.per_source):
        s["rows_kept"], s["rows_in_mix"] = int(keep[source_of == index].sum()), int(copies[source_of == index].sum())
        shares[s["task"]] = shares.get(s["task"], 0.0) + s["rows_in_mix"] / max(1, int(copies.sum()))
    stats = {**totals, "duplicates_removed": duplicates, "near_duplicates_removed": near_removed,
             **{f"{split}_rows": c for split, c in counts.items()}, "mean_chars": gathered.chars / max(1, len(keys)),
             "first_rows_removed": gathered.first_rows, "sources": gathered.per_source, "mixture_shares": shares}
    _log_kind(kind, reasons, counts, gathered.first_rows, removed)
    return stats, gathered.prompts


def _log_kind(kind: str, reasons: str, counts: dict, first_rows: dict, removed: list[dict]) -> None:
    logger.info("[prepare_data] %s: %s; %s", kind, reasons, ", ".join(f"{split} {c}" for split, c in counts.items()))
    for reason, rows in first_rows.items():
        if rows:
            example = next((x for x in removed if x["kind"] == kind and x["reason"] == reason), None)
            shown = f"; e.g. row {example['row']} ({example['detail']}): {example['text'][:80]!r}" if example else ""
            logger.info("[prepare_data] %s: %s at rows %s%s", kind, reason.replace("_", " "),
                        ", ".join(map(str, rows)), shown)


def _write_splits(folder: Path, parts: list[tuple[str, int]], splits: dict[str, np.ndarray], shard_rows: int,
                  target) -> None:
    """Second pass: each part's rows, repeated by their copy count, into the split's Parquet shards."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    writers = {split: _ShardWriter(folder, split, shard_rows) for split in splits}
    start = 0
    for path, length in parts:
        table = pq.read_table(path).select(target.names).cast(target)
        for split, copies in splits.items():
            mine = copies[start: start + length]
            if mine.any():
                writers[split].write(table.take(np.repeat(np.arange(length), mine)))
        start += length
    for writer in writers.values():
        writer.close()


class _ShardWriter:
    def __init__(self, folder: Path, split: str, shard_rows: int):
        self.folder, self.split, self.shard_rows = folder, split, shard_rows
        self.writer, self.rows, self.shard = None, 0, 0

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        while table.num_rows:
            if self.writer is None:
                path = self.folder / f"{self.split}-{self.shard:05d}.parquet"
                self.writer = pq.ParquetWriter(path, table.schema)
            room = self.shard_rows - self.rows
            self.writer.write_table(table.slice(0, room))
            self.rows += min(room, table.num_rows)
            table = table.slice(room)
            if self.rows >= self.shard_rows:
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.rows, self.shard = None, 0, self.shard + 1


# ---- reading prepared data -------------------------------------------------------------------


def split_files(data_dir: Path, kind: str, split: str) -> list[Path]:
    return sorted((Path(data_dir) / kind).glob(f"{split}-*.parquet"))


def load_split(data_dir: Path, kind: str, split: str, keep_tags: bool = False):
    """A prepared split as a datasets.Dataset (Arrow, memory-mapped), or None when there is none. The
    bookkeeping columns (source, row; and task unless `keep_tags`) are left out."""
    import datasets

    files = split_files(data_dir, kind, split)
    if not files:
        return None
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a bar per load says nothing the stage's own lines do not
    try:
        ds = datasets.Dataset.from_parquet([str(f) for f in files])
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()
    if len(ds) == 0:
        return None
    dropped = [c for c in BOOKKEEPING + ("provenance",)  # provenance: a synthesize stage's per-row record
               if c in ds.column_names and not (keep_tags and c == "task")]
    return ds.remove_columns(dropped)


# ---- stage kind ------------------------------------------------------------------------------


def _work(cfg: DataConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    from tasks import tracking

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
    from tasks.sources import fingerprint

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
