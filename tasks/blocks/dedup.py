"""Exact and near-duplicate detection and benchmark decontamination, in bulk over batches of rows.

Near duplicates are proposed, then verified. Each row's compared text (by default its user and assistant
turns: what rows share by construction, a system prompt, is left out) becomes a set of word shingles;
shingles that a large fraction of the rows hold (a template's fixed text, a chain-of-thought preamble) are
boilerplate and left out as well (`boilerplate`). MinHash signatures of what is left (rensa, a maintained
Rust MinHash library, ~30x datasketch here), cut into LSH bands chosen for recall, propose candidate pairs
(`candidate_pairs`); a row is removed only when the exact Jaccard similarity of its shingle set to an earlier
kept row's reaches the threshold (`jaccard`). The decisions are taken once over compact arrays, so they do
not depend on batch boundaries or on how many processes computed the shingles.

Contamination: an evaluation prompt of L words contaminates a training row that contains any of its
n-grams with n = min(ngram, L) (so a ten-word question is caught when it appears whole, which 13-grams
never do); prompts shorter than `min_words` are matched only against a training prompt equal to them
(after lower-casing and dropping punctuation), since a two-word n-gram would match everything. Matching
runs as one Aho-Corasick scan (ahocorasick-rs) per row and reports every evaluation n-gram a row holds; the
data stage then leaves out, as evidence, the n-grams that many training rows share (boilerplate).
"""

from __future__ import annotations

import hashlib
import os
import string

import numpy as np

PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u00bf\u00a1"})
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)
CANDIDATES_PER_BAND = 16  # earlier rows of the same LSH bucket a row is paired with, nearest first
HASH_BITS = 48  # of a shingle hash: a collision inside two documents' shingles is ~1e-10 at 200 shingles


_ASCII_PUNCTUATION = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: the unit of shingles and contamination n-grams."""
    if text.isascii():  # the same words, by a byte table: about twice as fast as str.translate's dict
        return text.lower().encode().translate(_ASCII_PUNCTUATION).decode().split()
    return text.lower().translate(PUNCTUATION).split()


def exact_key(canonical: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "little")


def lsh_shape(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) for candidate proposal: among the shapes that propose a pair at the threshold
    with probability >= `recall`, the one that proposes the fewest pairs below it (the least false-positive
    area of its S-curve). Recall is favoured because every candidate is verified afterwards."""
    grid = np.linspace(0.0, 1.0, 201)
    best, best_area = (num_perm, 1), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if 1.0 - (1.0 - threshold ** rows) ** bands < recall:
            continue
        p = 1.0 - (1.0 - grid ** rows) ** bands
        area = np.trapezoid(np.where(grid < threshold, p, 0.0), grid)
        if area < best_area:
            best, best_area = (bands, rows), area
    return best


def shingle_sets(word_lists: list[list[str]], shingle: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's set of word-shingle hashes, sorted (flat uint64), and the set sizes; every document
    has at least `shingle` words."""
    import rensa

    token_hashes = rensa.RMinHash.hash_token_sets(word_lists)
    lengths = np.fromiter((len(t) for t in token_hashes), dtype=np.int64, count=len(token_hashes))
    flat = _uint_rows(token_hashes, "Q", np.uint64)
    flat, lengths = _shingle(flat, lengths, shingle)
    return unique_per_document(flat, lengths)


def unique_per_document(flat: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values per document (flat; kept to their low HASH_BITS bits), and their counts. One sort
    of (document, value) packed into a uint64, chunk by chunk of documents: several times faster than a
    lexsort."""
    mask = np.uint64((1 << HASH_BITS) - 1)
    chunk = 1 << (64 - HASH_BITS)
    values, counts = [], []
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for first in range(0, len(lengths), chunk):
        last = min(first + chunk, len(lengths))
        doc = np.repeat(np.arange(last - first, dtype=np.uint64), lengths[first:last])
        packed = _sorted_distinct((doc << np.uint64(HASH_BITS)) | (flat[starts[first]: starts[last]] & mask))
        values.append(packed & mask)
        counts.append(np.bincount((packed >> np.uint64(HASH_BITS)).astype(np.int64), minlength=last - first))
    if not values:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(values), np.concatenate(counts).astype(np.int64)


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """np.unique by one in-place sort (numpy's hash-based unique is several times slower on uint64 here)."""
    values = np.sort(values)
    first = np.ones(len(values), dtype=bool)
    first[1:] = values[1:] != values[:-1]
    return values[first]


def sum_by_value(values: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, sorted; the sum of their weights, or how often each occurs), by one sort."""
    order = None if weights is None else np.argsort(values, kind="stable")
    values = np.sort(values) if order is None else values[order]
    starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]])) if len(values) else \
        np.zeros(0, dtype=np.int64)
    if weights is None:
        return values[starts], np.diff(np.concatenate([starts, [len(values)]]))
    return values[starts], np.add.reduceat(weights[order], starts) if len(starts) else weights[:0]


def document_frequency(flat: np.ndarray, at_least: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(values, number of documents holding each) over per-document-unique values, those held by at least
    `at_least` documents."""
    values, counts = sum_by_value(flat)
    common = counts >= at_least
    return values[common], counts[common]


def boilerplate(values: np.ndarray, counts: np.ndarray, documents: int, fraction: float, floor: int) -> np.ndarray:
    """The values held by at least `fraction` of `documents` (and by at least `floor` of them)."""
    return np.sort(values[counts >= max(fraction * documents, floor)])


def band_hashes(flat: np.ndarray, lengths: np.ndarray, num_perm: int, bands: int, rows: int, seed: int) -> np.ndarray:
    """(documents, bands) uint64 LSH band hashes of each shingle set's MinHash; every set is non-empty."""
    import rensa

    offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, seed)
    signatures = _uint_rows(matrix.to_rows(), "I", np.uint32).astype(np.uint64).reshape(len(lengths), num_perm)
    banded = signatures[:, : bands * rows].reshape(len(lengths), bands, rows)
    with np.errstate(over="ignore"):
        mixed = (banded * _MIX[np.arange(rows) % len(_MIX)]).sum(axis=2, dtype=np.uint64)
        mixed ^= mixed >> np.uint64(31)
        mixed *= np.uint64(0xBF58476D1CE4E5B9)
        mixed ^= np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # bands never collide
    return mixed


def _uint_rows(rows: list[list[int]], code: str, dtype) -> np.ndarray:
    """rensa's lists of unsigned integers as one flat array: row by row through array.array, about twice as fast
    as numpy converting the Python integers one by one."""
    import array

    return np.frombuffer(b"".join([array.array(code, row).tobytes() for row in rows]), dtype=dtype).copy()


def _shingle(flat: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of k consecutive word hashes inside each document (every document has at least
    k words); returns the flat shingle hashes and their count per document."""
    if k <= 1:
        return flat, lengths
    if (lengths < k).any():
        raise ValueError(f"every document needs at least {k} words for {k}-word shingles")
    ends = np.repeat(np.cumsum(lengths), lengths)
    padded = np.concatenate([flat, np.zeros(k, dtype=np.uint64)])
    with np.errstate(over="ignore"):
        window = np.zeros(len(flat), dtype=np.uint64)
        for j in range(k):
            window += padded[j: j + len(flat)] * _MIX[j % len(_MIX)]
    return window[np.arange(len(flat)) + k <= ends], lengths - k + 1


def candidate_pairs(bands: np.ndarray, per_band: int = CANDIDATES_PER_BAND) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """(earlier, later, shared bands) of the row pairs (indices into `bands`, reading order) that share an LSH
    band: each row with up to `per_band` of the rows before it in each bucket, nearest first."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(bands)
    with ThreadPoolExecutor(max_workers=min(bands.shape[1], os.cpu_count() or 1)) as pool:
        keys = [k for k in pool.map(lambda band: _bucket_pairs(bands[:, band], n, per_band), range(bands.shape[1]))
                if len(k)]
    if not keys:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    pairs, shared = np.unique(np.concatenate(keys), return_counts=True)
    return pairs // n, pairs % n, shared


def _bucket_pairs(values: np.ndarray, n: int, per_band: int) -> np.ndarray:
    """One band's candidate pairs as keys earlier * n + later. Only the rows whose band value repeats are
    ordered (most rows are alone in their bucket), which keeps the stable sort small."""
    ordered = np.sort(values)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(np.isin(values, repeated))
    order = rows[np.argsort(values[rows], kind="stable")]
    ordered = values[order]
    keys = []
    for d in range(1, per_band + 1):
        same = ordered[d:] == ordered[:-d]
        if not same.any():
            break
        keys.append(order[:-d][same].astype(np.int64) * n + order[d:][same])
    return np.concatenate(keys)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted sets of distinct values."""
    if not len(a) or not len(b):
        return 0.0
    both = len(np.intersect1d(a, b, assume_unique=True))
    return both / (len(a) + len(b) - both)


class Contamination:
    """The evaluation prompts a training row must not contain (see the module docstring)."""

    def __init__(self, prompts: list[str], ngram: int = 13, min_words: int = 4):
        import ahocorasick_rs

        self.short: set[str] = set()
        patterns: dict[str, None] = {}
        for prompt in prompts:
            w = words(prompt)
            if not w:
                continue
            if len(w) < min_words:
                self.short.add(" ".join(w))
                continue
            n = min(ngram, len(w))
            patterns.update((" " + " ".join(w[i: i + n]) + " ", None) for i in range(len(w) - n + 1))
        self.patterns = len(patterns)
        self.automaton = ahocorasick_rs.AhoCorasick(list(patterns), store_patterns=True) if patterns else None

    def __bool__(self) -> bool:
        return bool(self.patterns or self.short)

    def matches(self, row_words: list[str], prompt_words: list[str] | None) -> list[str]:
        """Every evaluation n-gram (or short prompt) the row contains."""
        found = []
        if self.short and prompt_words is not None and " ".join(prompt_words) in self.short:
            found.append(" ".join(prompt_words))
        if self.patterns:
            hits = self.automaton.find_matches_as_strings(" " + " ".join(row_words) + " ", overlapping=True)
            if hits:  # most rows hold none
                found += dict.fromkeys(p.strip() for p in hits)
        return found
