"""Verified near-duplicate removal over a kind's rows (tasks/blocks/dedup.py does the arithmetic): shingles
that many rows share (boilerplate) left out, LSH candidates among the rows still kept, each verified by the
exact Jaccard similarity of the two rows' shingle sets, recomputed from the stored parts for the proposed
rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.blocks.data_batches import BOILERPLATE_MIN_ROWS, compared_words, read_part, without_cyclic_gc


class NearDuplicates:
    """Verified near-duplicate removal over a kind's stored shingle sets (tasks/blocks/dedup.py): boilerplate shingles
    left out, LSH candidates among the rows still kept, each verified by exact Jaccard similarity."""

    def __init__(self, gathered, near: dict, threshold: float, boilerplate_fraction: float | None, seed: int, pool):
        """`gathered`: what a kind's batches reported (parts, bands, frequent shingles, rows with a set);
        `near`: the shingle and LSH settings; `pool`: the batch pool, which recomputes sets in its workers."""
        self.gathered, self.near, self.seed, self.pool = gathered, near, seed, pool
        self.threshold, self.boilerplate_fraction = threshold, boilerplate_fraction
        self.boilerplate = np.zeros(0, dtype=np.uint64)
        self.candidates = 0
        self.records: list[tuple[int, int, float]] = []  # (removed row, the kept row it duplicates, similarity)

    def _find_boilerplate(self) -> None:
        from tasks.blocks import dedup

        if not self.gathered.frequent or self.boilerplate_fraction is None:
            return
        unique, totals = dedup.sum_by_value(np.concatenate([v for v, _ in self.gathered.frequent]),
                                            np.concatenate([c for _, c in self.gathered.frequent]))
        self.boilerplate = dedup.boilerplate(unique, totals, self.gathered.near_rows, self.boilerplate_fraction,
                                             BOILERPLATE_MIN_ROWS["near"])

    def remove(self, keep: np.ndarray) -> np.ndarray:
        """Mask of the rows in `keep` that duplicate an earlier kept row. LSH bands from the first pass (or, when
        the kind has boilerplate, recomputed part by part without it) propose pairs; only the proposed rows'
        shingle sets are recomputed, to verify them."""
        from tasks.blocks import dedup

        self._find_boilerplate()
        duplicate = np.zeros(len(keep), dtype=bool)
        if len(self.boilerplate):  # the sets change: bands again, in the worker processes, part by part
            starts = self._part_starts()
            jobs = (_SetsJob(path, np.flatnonzero(keep[start: start + length]), self.boilerplate, self.near,
                             self.seed, bands=True) for (path, length), start in zip(self.gathered.parts, starts))
            eligible, band_rows = [], []
            for (mine, _, _, bands), start in zip(self.pool.map(jobs, part_sets), starts):
                if len(mine):
                    eligible.append(mine + start)
                    band_rows.append(bands)
            if not eligible:
                return duplicate
            eligible, bands = np.concatenate(eligible), np.concatenate(band_rows)
            del band_rows
        else:  # the first pass's bands; rows without a shingle set have all-zero bands
            eligible, chosen, start = [], [], 0
            while self.gathered.bands:  # chunk by chunk, each freed once taken: never two copies of them all
                chunk = self.gathered.bands.pop(0)
                mine = keep[start: start + len(chunk)] & chunk.any(axis=1)
                eligible.append(np.flatnonzero(mine) + start)
                chosen.append(chunk[mine])
                start += len(chunk)
            eligible = np.concatenate(eligible)
            if not len(eligible):
                return duplicate
            bands = np.concatenate(chosen)
            del chosen
        earlier, later, shared = dedup.candidate_pairs(bands)
        del bands
        self.candidates = len(earlier)
        earlier, later = eligible[earlier], eligible[later]
        sets = self._proposed_sets(np.union1d(earlier, later))
        order = np.lexsort((earlier, -shared, later))  # per later row: the pairs sharing the most bands first
        for e, l in zip(earlier[order].tolist(), later[order].tolist()):
            if duplicate[l] or duplicate[e]:
                continue
            similarity = dedup.jaccard(sets[e], sets[l])
            if similarity >= self.threshold:
                duplicate[l] = True
                self.records.append((l, e, similarity))
        return duplicate

    def _part_starts(self) -> np.ndarray:
        """Where each part's rows start in reading order (and, last, the number of rows)."""
        return np.cumsum([0] + [length for _, length in self.gathered.parts])

    def _proposed_sets(self, rows: np.ndarray) -> dict[int, np.ndarray]:
        """The shingle sets of the proposed rows (sorted), recomputed from the stored rows part by part in the
        workers."""
        starts = self._part_starts()
        bounds = np.searchsorted(rows, starts)
        wanted = [(part, rows[bounds[part]: bounds[part + 1]] - starts[part])
                  for part in range(len(self.gathered.parts)) if bounds[part + 1] > bounds[part]]
        jobs = (_SetsJob(self.gathered.parts[part][0], mine, self.boilerplate, self.near, self.seed, bands=False)
                for part, mine in wanted)
        sets = {}
        for (mine, flat, offsets, _), (part, _) in zip(self.pool.map(jobs, part_sets), wanted):
            for index, row in enumerate(mine.tolist()):
                sets[int(starts[part]) + row] = flat[offsets[index]: offsets[index + 1]]
        return sets


@dataclass
class _SetsJob:
    path: str  # a scratch part (write_part)
    rows: np.ndarray  # indices into the part, ascending
    boilerplate: np.ndarray
    near: dict
    seed: int
    bands: bool  # also the LSH band hashes of the sets


@without_cyclic_gc
def part_sets(job: _SetsJob) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(the given rows whose shingle set is not empty once the boilerplate is left out, their sets as flat values
    and offsets, their LSH band hashes when asked for). Recomputed from the stored rows: cheaper than writing
    every row's set during the first pass, when only the rows LSH proposes are verified."""
    from tasks.blocks import dedup

    near = job.near
    no_bands = np.zeros((0, near["bands"]), dtype=np.uint64) if job.bands else None
    stored = []
    if len(job.rows):
        part = read_part(job.path)
        columns = [name for name in ("text", "prompt", "completion", "chosen", "rejected") if name in part.column_names]
        stored = part.select(columns).take(job.rows).to_pylist()
    word_lists, rows = [], []
    for row, record in zip(job.rows.tolist(), stored):
        compared = compared_words(record, near)
        if compared is not None:
            word_lists.append(compared)
            rows.append(row)
    if not word_lists:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64), np.zeros(1, dtype=np.int64), no_bands
    flat, sizes = dedup.shingle_sets(word_lists, near["shingle"])
    if len(job.boilerplate):
        ordinary = ~np.isin(flat, job.boilerplate)
        flat = flat[ordinary]
        sizes = np.bincount(np.repeat(np.arange(len(sizes)), sizes)[ordinary], minlength=len(sizes))
    rows, sizes = np.array(rows, dtype=np.int64)[sizes > 0], sizes[sizes > 0]
    bands = no_bands
    if job.bands and len(rows):
        bands = dedup.band_hashes(flat, sizes, near["num_perm"], near["bands"], near["rows"], job.seed)
    return rows, flat, np.concatenate([[0], np.cumsum(sizes)]), bands
