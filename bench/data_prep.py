"""prepare_data at scale: N chat rows of about 600 characters (5% exact and 5% near duplicates, 0.1% holding
an evaluation prompt) read, normalized, exact- and near-deduplicated, decontaminated and written.

    python bench/data_prep.py [N ...] [--repeats R] [--workers W]     (default: 100000 300000 1000000)

Prints one line per size and run: rows=N seconds=S rows_per_s=R cpu_seconds=C peak_rss_mb=M, then the median
per size. CPU seconds (the stage's process and its workers, user + system, imports included) vary less than
wall time on a shared machine.
Peak RSS is the largest resident set of the stage's process plus its worker processes at one time (sampled
every 50 ms), each run in a fresh process. The generated files are kept under $TMPDIR/posttrain-bench-data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_rows(n: int, path: Path, eval_path: Path) -> None:
    """Deterministic chat rows: prompt ~20 words, reply ~80 words, from a 20k-word vocabulary."""
    rng = random.Random(0)
    vocab = [f"{''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(2, 9)))}"
             for _ in range(20000)]
    eval_prompts = [" ".join(rng.choices(vocab, k=rng.randint(6, 24))) + "?" for _ in range(500)]
    eval_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in eval_prompts))
    recent: list[str] = []
    with open(path, "w") as f:
        for i in range(n):
            draw = rng.random()
            if draw < 0.05 and recent:  # an exact duplicate of a recent row
                line = rng.choice(recent)
            else:
                if draw < 0.10 and recent:  # a near duplicate: a recent row with two words changed
                    row = json.loads(rng.choice(recent))
                    words = row["messages"][1]["content"].split()
                    for _ in range(2):
                        words[rng.randrange(len(words))] = rng.choice(vocab)
                    row["messages"][1]["content"] = " ".join(words)
                else:
                    prompt = " ".join(rng.choices(vocab, k=20))
                    if draw > 0.999:
                        prompt += " " + rng.choice(eval_prompts)
                    reply = " ".join(rng.choices(vocab, k=80)) + "."
                    row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}
                line = json.dumps(row)
                recent = (recent + [line])[-1000:]
            f.write(line + "\n")


def run_once(source: Path, eval_source: Path, workers: int) -> dict:
    code = f"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from tasks.kinds.prepare_data import DataConfig, prepare_data
out = Path(sys.argv[1])
cfg = DataConfig(sft={{"source": {str(source)!r}}}, eval={{"source": {str(eval_source)!r}}}, workers={workers})
started = time.perf_counter()
stats = prepare_data(cfg, out, seed=0)
seconds = time.perf_counter() - started
cpu = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                             resource.getrusage(resource.RUSAGE_CHILDREN)))
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu, "stats": stats}}))
"""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)
        result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    if proc.returncode:
        raise SystemExit(f"prepare_data failed with exit code {proc.returncode}")
    return {**result, "peak_rss_mb": peak / 2**20}


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", type=int, default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="data.workers (0 = one per core)")
    args = parser.parse_args()
    cache = Path(tempfile.gettempdir()) / "posttrain-bench-data"
    cache.mkdir(exist_ok=True)
    medians = {}
    for n in args.sizes:
        source, eval_source = cache / f"chat-{n}.jsonl", cache / f"eval-{n}.jsonl"
        if not source.exists():
            make_rows(n, source.with_suffix(".tmp"), eval_source)
            source.with_suffix(".tmp").rename(source)
        runs = []
        for _ in range(args.repeats):
            r = run_once(source, eval_source, args.workers)
            s = r["stats"]
            runs.append(r)
            print(f"rows={n} seconds={r['seconds']:.1f} rows_per_s={n / r['seconds']:.0f} "
                  f"cpu_seconds={r['cpu_seconds']:.0f} peak_rss_mb={r['peak_rss_mb']:.0f} "
                  f"(kept {s['sft/train_rows'] + s['sft/eval_rows']:.0f}, "
                  f"exact {s['sft/duplicates_removed']:.0f}, near {s['sft/near_duplicates_removed']:.0f}, "
                  f"contaminated {s['sft/contaminated_removed']:.0f})", flush=True)
        medians[n] = statistics.median(r["seconds"] for r in runs)
        if args.repeats > 1:
            print(f"median rows={n} seconds={medians[n]:.1f} rows_per_s={n / medians[n]:.0f} "
                  f"cpu_seconds={statistics.median(r['cpu_seconds'] for r in runs):.0f} "
                  f"peak_rss_mb={statistics.median(r['peak_rss_mb'] for r in runs):.0f}", flush=True)
    if len(medians) > 1:
        small, large = min(medians), max(medians)
        print(f"growth: {large} rows took {medians[large] / medians[small]:.1f}x the time of {small} rows "
              f"({large / small:.0f}x the rows)")


if __name__ == "__main__":
    main()
