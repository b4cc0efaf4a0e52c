"""prepare_data's per-batch work, in worker processes: normalize a batch of rows into the canonical shapes,
drop what teaches nothing (counted, with samples), find the evaluation n-grams each row holds, hash the rows
for the whole-kind duplicate decisions (exact keys, LSH bands of word-shingle sets), and write the kept rows
as a scratch part (Arrow IPC). Also the process pool that runs batches with a bounded number in flight.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.blocks import dedup
from tasks.blocks.shapes import EmptyReply, Identical, NothingTrained, normalize, prompt_text, row_text
from tasks.machinery.splits import rows_table, schema

logger = logging.getLogger("posttrain")

TRAINING_KINDS = ("sft", "preference", "unpaired", "text")
SAMPLES_PER_REASON = 5



REASONS = ("too_long_removed", "identical_pairs_removed", "empty_replies_removed", "untrained_rows_removed",
           "contaminated_removed")
BATCH_REASONS = REASONS[:-1]  # decided per batch; contamination is decided per kind (boilerplate is left out)
BOILERPLATE_MIN_ROWS = {"near": 20, "contamination": 10}


@dataclass
class BatchJob:
    """Everything a worker needs for one batch; plain data, so it pickles cheaply."""

    kind: str
    source_index: int
    src: dict  # source, tag, columns
    rows: list  # (row number, record or a JSONL line's bytes)
    part: str  # where the batch's kept rows go (a scratch part: write_part)
    settings: dict


class _Removed:
    """Per reason a row was dropped: the count, the first ten row numbers and a few examples."""

    def __init__(self, kind: str, source: str):
        self.kind, self.source = kind, source
        self.counts = dict.fromkeys(BATCH_REASONS, 0)
        self.first_rows: dict[str, list[int]] = {reason: [] for reason in BATCH_REASONS}
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
    from tasks.blocks.dedup import Contamination

    global _CONTAMINATION
    _CONTAMINATION = Contamination(prompts, ngram, min_words) if prompts else None


def _uses_tools(row: dict) -> bool:
    return bool(row.get("tools")) or any(m["tool_calls"] or m["role"] == "tool"
                                         for field in ("prompt", "completion", "chosen", "rejected")
                                         for m in row.get(field) or ())


def compared_text(row: dict, roles: list[str]) -> str:
    """What near-duplicate detection compares: a text row's text, or the content of the turns in `roles`."""
    if "text" in row:
        return row["text"]
    return "\n".join(m["content"] for field in ("prompt", "completion", "chosen", "rejected")
                     for m in row.get(field) or () if m["role"] in roles)


def compared_words(row: dict, near: dict, text: str | None = None, text_words: list[str] | None = None
                   ) -> list[str] | None:
    """The words near-duplicate detection shingles for a row, or None when the row is too short to have a set
    (`text_words`, the words of the row's whole `text`, are reused when the compared text is the same)."""
    compared = compared_text(row, near["compare"])
    found = text_words if text_words is not None and compared == text else dedup.words(compared)
    return found if len(found) >= max(near["min_words"], near["shingle"]) else None


def without_cyclic_gc(work):
    """Run `work` with Python's cyclic garbage collector paused: per-row work allocates many small dicts and
    lists and makes no reference cycles, so the collector would only walk the batch's objects again and again
    (measured at 5-20% of a batch's time); what the batch frees, reference counting frees."""

    @functools.wraps(work)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return work(*args, **kwargs)
        gc.disable()
        try:
            return work(*args, **kwargs)
        finally:
            gc.enable()

    return paused


@without_cyclic_gc
def process_batch(job: BatchJob) -> dict:
    """Normalize one batch, drop what teaches nothing, find the evaluation n-grams each row holds, hash the rows
    for the duplicate decisions (LSH bands of their shingle sets), and write the rows as a scratch part.
    Returns counts, samples and per-row arrays."""
    import orjson

    from tasks.machinery.sources import parse_line, rename

    s, near = job.settings, job.settings["near"] if job.kind != "eval" else None
    contamination = _CONTAMINATION if job.kind in TRAINING_KINDS else None
    removed = _Removed(job.kind, job.src["source"])
    counts = {"rows_read": len(job.rows), "multi_turn_rows": 0, "tool_rows": 0, "context_turn_rows": 0}
    kept, numbers, keys, word_lists, long_rows, prompts, hits, chars = [], [], [], [], [], [], [], 0
    rows = job.rows
    if rows and isinstance(rows[0][1], bytes):
        rows = [(number, parse_line(job.src["source"], number, line)) for number, line in rows]
    for number, record in rename(job.src["columns"], rows):
        try:
            row = normalize(job.kind, record, f"{job.src['source']}: row {number}")
        except Identical:
            removed.add("identical_pairs_removed", number, json.dumps(record, ensure_ascii=False), "chosen == rejected")
            continue
        except EmptyReply:
            removed.add("empty_replies_removed", number, json.dumps(record, ensure_ascii=False),
                        "an empty or whitespace reply")
            continue
        except NothingTrained:
            removed.add("untrained_rows_removed", number, json.dumps(record, ensure_ascii=False),
                        "every assistant turn has weight 0")
            continue
        text = row_text(row)
        if job.kind not in ("eval", "text") and len(text) > s["max_chars"]:
            removed.add("too_long_removed", number, text, f"{len(text)} characters")
            continue
        row_words = dedup.words(text) if (contamination is not None or near) else None
        if contamination is not None:
            prompt_words = dedup.words(prompt_text(row)) if contamination.short and "prompt" in row else None
            found = contamination.matches(row_words, prompt_words)
            if found:
                hits.append((len(kept), found))
        counts["multi_turn_rows"] += job.kind == "sft" and len(row["completion"]) > 1
        counts["context_turn_rows"] += job.kind == "sft" and any(m["weight"] == 0 for m in row["completion"])
        counts["tool_rows"] += _uses_tools(row)
        chars += len(text)
        keys.append(dedup.exact_key(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)))
        if job.kind == "eval":
            prompts.append(prompt_text(row))
        if near:
            compared = compared_words(row, near, text, row_words)
            if compared is not None:
                word_lists.append(compared)
                long_rows.append(len(kept))
        row["task"], row["source"], row["row"] = job.src["tag"], job.source_index, number
        kept.append(row)
        numbers.append(number)
    if kept:
        write_part(rows_table(kept, schema(job.kind)), job.part)
    frequent = bands = None
    if near and kept:  # shingle sets (rows too short for near dedup have none); not stored: `part_sets`
        sizes = np.zeros(len(kept), dtype=np.int64)  # recomputes those of the few rows verification needs
        flat = np.zeros(0, dtype=np.uint64)
        if word_lists:
            flat, sizes[long_rows] = dedup.shingle_sets(word_lists, near["shingle"])
        # shingles held by at least 1% of the batch's rows: enough to find boilerplate (>= 10% of all rows by
        # default) to within a percentage point, without carrying every pair of duplicates' shingles along
        frequent = dedup.document_frequency(flat, max(2, -(-len(kept) // 100)))
        # LSH bands of the whole sets, used as they are when the kind turns out to have no boilerplate
        bands = np.zeros((len(kept), near["bands"]), dtype=np.uint64)
        if word_lists:
            bands[sizes > 0] = dedup.band_hashes(flat, sizes[sizes > 0], near["num_perm"], near["bands"],
                                                 near["rows"], s["seed"])
    return {"counts": {**counts, **removed.counts}, "first_rows": removed.first_rows, "samples": removed.samples,
            "chars": chars, "keys": np.array(keys, dtype=np.uint64), "numbers": np.array(numbers, dtype=np.int64),
            "hits": hits, "frequent_shingles": frequent, "bands": bands, "prompts": prompts,
            "near_rows": len(word_lists),
            "part": job.part if kept else None,
            "source": job.source_index}


# ---- the whole-kind decisions and the output ---------------------------------------------------


def uniform_bits(keys: np.ndarray, salt: int) -> np.ndarray:
    """64 random-looking bits per key, fixed by (key, salt): splitmix64 of both."""
    with np.errstate(over="ignore"):
        x = keys.astype(np.uint64) ^ np.uint64((salt * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per key, fixed by (key, salt)."""
    return (uniform_bits(keys, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def write_part(table, path: str) -> None:
    """A batch's kept rows as a scratch part: Arrow IPC, uncompressed. Written once, read by the second pass
    (memory-mapped) and deleted at the end of the stage; several times cheaper than Parquet both ways."""
    import pyarrow.feather as feather

    feather.write_feather(table, path, compression="uncompressed")


def read_part(path: str):
    import pyarrow.feather as feather

    return feather.read_table(path, memory_map=True)


@dataclass
class ShardJob:
    """One output shard: the pieces of the stored parts it holds, in order."""

    path: str
    pieces: list  # (a scratch part, indices of its rows, each repeated by its copy count)
    schema: object  # the kind's output schema (pyarrow)


def write_splits(folder: Path, parts: list[tuple[str, int]], splits: dict[str, np.ndarray], shard_rows: int,
                 target, pool: "BatchPool") -> None:
    """Second pass: each part's rows, repeated by their copy count, into the split's Parquet shards of
    `shard_rows` rows. Which rows go to which shard is known from the counts alone, so the shards are
    written independently, in the worker processes."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, copies in splits.items():
        pieces, rows, start, first_job = [], 0, 0, len(jobs)
        for path, length in parts:
            taken = np.repeat(np.arange(length, dtype=np.int32), copies[start: start + length])
            start += length
            while len(taken):
                piece, taken = taken[: shard_rows - rows], taken[shard_rows - rows:]
                pieces.append((path, piece))
                rows += len(piece)
                if rows == shard_rows:
                    jobs.append(ShardJob(str(folder / f"{split}-{len(jobs) - first_job:05d}.parquet"), pieces,
                                         target))
                    pieces, rows = [], 0
        if pieces:
            jobs.append(ShardJob(str(folder / f"{split}-{len(jobs) - first_job:05d}.parquet"), pieces, target))
    for _ in pool.map(iter(jobs), write_shard):
        pass


def write_shard(job: ShardJob) -> str:
    import pyarrow.parquet as pq

    loaded = table = None
    with pq.ParquetWriter(job.path, job.schema) as writer:
        for path, rows in job.pieces:
            if path != loaded:
                table, loaded = read_part(path).select(job.schema.names).cast(job.schema), path
            writer.write_table(table.take(rows))
    return job.path


class BatchPool:
    """Batches to worker processes with a bounded number in flight (memory stays bounded), results in
    order; a source of a single batch is done in this process."""

    def __init__(self, workers: int, init_args: tuple):
        self.workers, self.init_args, self.executor = workers, init_args, None
        _set_contamination(*init_args)

    def map(self, jobs, work=None):
        work = work or process_batch
        jobs = iter(jobs)
        first = next(jobs, None)
        if first is None:
            return
        second = next(jobs, None)
        if second is None or self.workers <= 1:
            yield work(first)
            if second is not None:
                yield work(second)
                for job in jobs:
                    yield work(job)
            return
        if self.executor is None:
            import multiprocessing

            # spawned, not forked: rensa computes on a Rust thread pool, which a forked child inherits without
            # its threads (and then waits forever).
            self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_set_contamination, initargs=self.init_args)
        try:
            pending = [self.executor.submit(work, first), self.executor.submit(work, second)]
            for job in jobs:
                if len(pending) >= 2 * self.workers:
                    yield pending.pop(0).result()
                pending.append(self.executor.submit(work, job))
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


def worker_count(configured: int) -> int:
    """data.workers, or (0) one process per CPU core, at most 8."""
    if configured:
        return configured
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


