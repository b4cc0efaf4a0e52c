"""Near-duplicate removal, precision and recall: pairs generated at known Jaccard similarity (0.5 ... 1.0) go
through the data stage with its default settings; prints, per similarity bin, the share of the second rows
removed, and checks the data stage's promise around the threshold (default 0.8):

  below threshold - 0.05: under 1% removed          above threshold + 0.05: over 95% removed

    python bench/near_dedup.py [--pairs 4000] [--words 200] [--seeds 0 1 2]

Each pair is a document of distinct random words and a copy with m words replaced (m drawn per pair); the
similarity is measured on the shingle sets the stage compares (tasks/blocks/dedup.py), not assumed from m. Every
document is also distinct from every other pair's. Writes bench/results/near_dedup.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_pairs(n: int, words: int, seed: int) -> tuple[list[dict], list[float]]:
    from tasks.blocks import dedup

    rng = random.Random(seed)
    firsts, seconds, similarity = [], [], []
    for p in range(n):
        doc = [f"p{p}w{i}" for i in range(words)]
        copy = list(doc)
        for i in rng.sample(range(words), rng.randint(1, words // 8)):
            copy[i] = f"p{p}x{rng.randrange(10**9)}"
        compared = [["answer", "this"] + d for d in (doc, copy)]
        flat, sizes = dedup.shingle_sets(compared, 3)
        similarity.append(dedup.jaccard(flat[: sizes[0]], flat[sizes[0]:]))
        firsts.append({"prompt": "Answer this.", "completion": " ".join(doc)})
        seconds.append({"prompt": "Answer this.", "completion": " ".join(copy)})
    return firsts + seconds, similarity


def main() -> None:
    from tasks.kinds.prepare_data import DataConfig, DatasetSource, prepare_data, split_files

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "near_dedup.json"))
    args = parser.parse_args()
    import pyarrow.parquet as pq

    threshold = DataConfig().near_dedup.threshold
    edges = [0.5 + 0.05 * i for i in range(11)]
    results, ok = {}, True
    for seed in args.seeds:
        rows, similarity = make_pairs(args.pairs, args.words, seed)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "pairs.jsonl"
            source.write_text("".join(json.dumps(r) + "\n" for r in rows))
            cfg = DataConfig(sft=DatasetSource(source=str(source)), eval_fraction=0.0, max_chars=100_000)
            started = time.perf_counter()
            prepare_data(cfg, Path(tmp) / "out", seed)
            seconds = time.perf_counter() - started
            kept = {r["row"] for f in split_files(Path(tmp) / "out", "sft", "train")
                    for r in pq.read_table(f, columns=["row"]).to_pylist()}
        removed = [args.pairs + p + 1 not in kept for p in range(args.pairs)]
        firsts_lost = sum(p + 1 not in kept for p in range(args.pairs))
        print(f"seed {seed}: {2 * args.pairs} rows in {seconds:.1f} s; first rows removed: {firsts_lost}")
        print(f"{'Jaccard':>13} {'pairs':>6} {'removed':>8}")
        bins = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            mine = [r for r, s in zip(removed, similarity) if lo <= s < hi or (hi >= 1.0 and s >= lo)]
            share = sum(mine) / len(mine) if mine else float("nan")
            bins.append({"low": round(lo, 2), "high": round(hi, 2), "pairs": len(mine), "removed": share})
            print(f"[{lo:.2f}, {hi:.2f}) {len(mine):>6} {share:>8.3f}")
        below = [r for r, s in zip(removed, similarity) if s < threshold - 0.05]
        above = [r for r, s in zip(removed, similarity) if s >= threshold + 0.05]
        exact_below = [r for r, s in zip(removed, similarity) if s < threshold]
        summary = {"below_removed": sum(below) / len(below), "above_removed": sum(above) / len(above),
                   "below_threshold_removed": sum(exact_below) / len(exact_below), "first_rows_removed": firsts_lost,
                   "seconds": seconds, "bins": bins}
        passed = summary["below_removed"] < 0.01 and summary["above_removed"] > 0.95 and firsts_lost == 0
        ok &= passed
        print(f"J < {threshold - 0.05:.2f}: {summary['below_removed']:.2%} removed (< 1%); J >= {threshold + 0.05:.2f}: "
              f"{summary['above_removed']:.2%} removed (> 95%); J < {threshold}: "
              f"{summary['below_threshold_removed']:.2%} removed -> {'PASS' if passed else 'FAIL'}\n")
        results[seed] = summary
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
