"""Where prepare_data's per-row time goes: each step of a worker's batch (tasks/blocks/data_batches.py
`process_batch`) timed on its own, over the rows bench/data_prep.py generates, in one process.

    python bench/data_prep_steps.py [--rows 20000] [--batch 2000]

Prints microseconds per row and the share of each step, and the total. The steps are called as the stage
calls them, one batch at a time; the sum is a little below the stage's own time per row (no bookkeeping).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data_prep import make_rows  # noqa: E402


def main() -> None:
    import orjson
    import pyarrow.feather  # noqa: F401  (imported before the clock, as in a worker after its first batch)

    from tasks.blocks import dedup
    from tasks.blocks.data_batches import _uses_tools, compared_words, write_part
    from tasks.blocks.shapes import normalize, row_text
    from tasks.kinds.prepare_data import DataConfig
    from tasks.machinery.splits import rows_table, schema

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    cache = Path(tempfile.gettempdir()) / "posttrain-bench-data"
    cache.mkdir(exist_ok=True)
    source, eval_source = cache / f"chat-{args.rows}.jsonl", cache / f"eval-{args.rows}.jsonl"
    if not source.exists():
        make_rows(args.rows, source.with_suffix(".tmp"), eval_source)
        source.with_suffix(".tmp").rename(source)
    lines = source.read_bytes().splitlines()
    cfg = DataConfig(sft={"source": str(source)})
    near_cfg = cfg.near_dedup
    bands, rows_per_band = dedup.lsh_shape(near_cfg.threshold, near_cfg.num_perm)
    near = {"compare": near_cfg.compare, "min_words": near_cfg.min_words, "shingle": near_cfg.shingle}
    contamination = dedup.Contamination([json.loads(x)["prompt"] for x in eval_source.read_text().splitlines()],
                                        cfg.decontaminate.ngram, cfg.decontaminate.min_words)
    seconds: dict[str, float] = {}

    def step(name: str, work):
        started = time.perf_counter()
        result = work()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return result

    def one_batch(first: int, batch: list[bytes], out: str) -> None:
        records = step("parse JSON", lambda: [orjson.loads(x) for x in batch])
        rows = step("normalize", lambda: [normalize("sft", r, "row") for r in records])
        texts = step("row text", lambda: [row_text(r) for r in rows])
        words = step("words", lambda: [dedup.words(t) for t in texts])
        step("contamination scan", lambda: [contamination.matches(w, None) for w in words])
        step("tool use, turn counts", lambda: [(_uses_tools(r), any(m["weight"] == 0 for m in r["completion"]))
                                               for r in rows])
        step("exact key", lambda: [dedup.exact_key(orjson.dumps(r, option=orjson.OPT_SORT_KEYS)) for r in rows])
        compared = step("compared words", lambda: [compared_words(r, near, t, w)
                                                   for r, t, w in zip(rows, texts, words)])
        for number, r in zip(itertools.count(first), rows):
            r["task"], r["source"], r["row"] = "chat", 0, number
        table = step("Arrow table", lambda: rows_table(rows, schema("sft")))
        step("scratch part", lambda: write_part(table, f"{out}/part.arrow"))
        flat, sizes = step("shingle sets", lambda: dedup.shingle_sets([c for c in compared if c], near["shingle"]))
        step("frequent shingles", lambda: dedup.document_frequency(flat, max(2, -(-len(rows) // 100))))
        step("MinHash + LSH bands", lambda: dedup.band_hashes(flat, sizes, near_cfg.num_perm, bands,
                                                              rows_per_band, 0))

    gc.disable()  # as the stage's batches run (data_batches.without_cyclic_gc)
    with tempfile.TemporaryDirectory() as out:
        one_batch(0, lines[:100], out)  # untimed: one-time set-up (pyarrow's first table takes ~0.25 s)
        seconds.clear()
        for first in range(0, len(lines), args.batch):
            one_batch(first, lines[first: first + args.batch], out)
    total = sum(seconds.values())
    for name, spent in seconds.items():
        print(f"{name:22s} {spent / len(lines) * 1e6:6.1f} us/row  {100 * spent / total:4.1f}%")
    print(f"{'total':22s} {total / len(lines) * 1e6:6.1f} us/row  ({len(lines)} rows, batches of {args.batch})")


if __name__ == "__main__":
    main()
