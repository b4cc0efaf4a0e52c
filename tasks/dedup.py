"""Exact and near-duplicate detection and benchmark decontamination, in bulk over batches of rows.

Near duplicates: MinHash signatures (rensa, a maintained Rust MinHash library, ~30x datasketch here) over
word shingles, cut into LSH bands. Each batch yields its rows' band hashes; when every batch is in, a row
is a near duplicate when it shares a band with an earlier row (`near_duplicates`). Deciding once over
compact arrays, not in a growing index of objects, keeps memory at ~8 bytes per band per row and the
decision independent of batch boundaries or of how many processes computed the signatures.

Contamination: an evaluation prompt of L words contaminates a training row that contains any of its
n-grams with n = min(ngram, L) (so a ten-word question is caught when it appears whole, which 13-grams
never do); prompts shorter than `min_words` are matched only against a training prompt equal to them
(after lower-casing and dropping punctuation), since a two-word n-gram would match everything.
Matching runs as one Aho-Corasick scan (pyahocorasick) per row.
"""

from __future__ import annotations

import hashlib
import itertools
import string

import numpy as np

PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u00bf\u00a1"})
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: the unit of shingles and contamination n-grams."""
    return text.lower().translate(PUNCTUATION).split()


def exact_key(canonical: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=8).digest(), "little")


def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) whose S-curve best separates pairs above and below the Jaccard threshold:
    the least false-positive plus false-negative probability mass, the criterion datasketch's MinHashLSH
    uses (its helper is private, so it is restated here)."""
    grid = np.linspace(0.0, 1.0, 201)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if rows == 0:
            break
        p = 1.0 - (1.0 - grid ** rows) ** bands
        error = np.trapezoid(np.where(grid < threshold, p, 0.0), grid) + np.trapezoid(
            np.where(grid >= threshold, 1.0 - p, 0.0), grid)
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


def band_hashes(word_lists: list[list[str]], num_perm: int, bands: int, rows: int, shingle: int,
                seed: int) -> np.ndarray:
    """(len(word_lists), bands) uint64 LSH band hashes of each document's word-shingle MinHash; every
    document has at least `shingle` words."""
    import rensa

    token_hashes = rensa.RMinHash.hash_token_sets(word_lists)
    lengths = np.fromiter((len(t) for t in token_hashes), dtype=np.int64, count=len(token_hashes))
    flat = np.fromiter(itertools.chain.from_iterable(token_hashes), dtype=np.uint64, count=int(lengths.sum()))
    shingles, shingle_lengths = _shingle(flat, lengths, shingle)
    offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
    np.cumsum(shingle_lengths, out=offsets[1:])
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(shingles, offsets, num_perm, seed)
    signatures = np.array(matrix.to_rows(), dtype=np.uint64).reshape(len(word_lists), num_perm)
    banded = signatures[:, : bands * rows].reshape(len(word_lists), bands, rows)
    with np.errstate(over="ignore"):
        mixed = (banded * _MIX[np.arange(rows) % len(_MIX)]).sum(axis=2, dtype=np.uint64)
        mixed ^= mixed >> np.uint64(31)
        mixed *= np.uint64(0xBF58476D1CE4E5B9)
        mixed ^= np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # bands never collide
    return mixed


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


def near_duplicates(bands: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Mask over `candidates` (row indices in reading order): rows that share an LSH band with an earlier
    candidate row."""
    duplicate = np.zeros(len(candidates), dtype=bool)
    for band in range(bands.shape[1]):
        values = bands[candidates, band]
        order = np.argsort(values, kind="stable")
        same_as_previous = np.zeros(len(order), dtype=bool)
        same_as_previous[1:] = values[order][1:] == values[order][:-1]
        duplicate[order[same_as_previous]] = True
    return duplicate


class Contamination:
    """The evaluation prompts a training row must not contain (see the module docstring)."""

    def __init__(self, prompts: list[str], ngram: int = 13, min_words: int = 4):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        self.short: set[str] = set()
        self.patterns = 0
        for prompt in prompts:
            w = words(prompt)
            if not w:
                continue
            if len(w) < min_words:
                self.short.add(" ".join(w))
                continue
            n = min(ngram, len(w))
            for i in range(len(w) - n + 1):
                pattern = " " + " ".join(w[i: i + n]) + " "
                if pattern not in self.automaton:
                    self.automaton.add_word(pattern, pattern)
                    self.patterns += 1
        if self.patterns:
            self.automaton.make_automaton()

    def __bool__(self) -> bool:
        return bool(self.patterns or self.short)

    def match(self, row_words: list[str], prompt_words: list[str] | None) -> str | None:
        """The evaluation n-gram (or short prompt) the row contains, or None."""
        if self.short and prompt_words is not None and " ".join(prompt_words) in self.short:
            return " ".join(prompt_words)
        if self.patterns:
            for _, pattern in self.automaton.iter(" " + " ".join(row_words) + " "):
                return pattern.strip()
        return None
