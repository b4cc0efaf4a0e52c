"""What an evaluation's numbers mean, shared by the kinds that compute or read them (evaluate, prompt_search,
promote): whether a reply answers a reference, paired bootstrap intervals, and the file an evaluation's
metrics live in."""

from __future__ import annotations

import re

EVALUATION_METRICS = "metrics.json"  # in the evaluate stage's output: every metric it reports
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_matches(response: str, reference: str) -> bool:
    """Exact match after trimming; for a numeric reference, the first number in the response."""
    clean = lambda s: s.strip().strip(".!").strip().lower()  # noqa: E731
    if clean(response) == clean(reference):
        return True
    if _NUMBER.fullmatch(reference.strip()):
        found = _NUMBER.search(response)
        return found is not None and float(found.group()) == float(reference)
    return False


def bootstrap_intervals(per_prompt: dict[str, list[float]], samples: int, confidence: float,
                        seed: int) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the mean of each series, all resampled with the same prompt indices
    (seeded), so intervals of differences built from paired series are paired too."""
    import numpy as np

    lengths = {len(v) for v in per_prompt.values()}
    if not per_prompt or samples == 0:
        return {}
    if len(lengths) != 1:
        raise ValueError(f"bootstrap: series of different lengths {sorted(lengths)}")
    n = lengths.pop()
    index = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    tail = (1 - confidence) / 2 * 100
    out = {}
    for name, values in per_prompt.items():
        means = np.asarray(values, dtype=float)[index].mean(axis=1)
        low, high = np.percentile(means, [tail, 100 - tail])
        out[name] = (float(low), float(high))
    return out
