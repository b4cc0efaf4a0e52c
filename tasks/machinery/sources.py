"""Reading a data source as a stream of row batches, and fingerprinting it without reading it twice.

A source is a local path or fsspec URI (s3://...) to JSONL, JSON, Parquet or CSV; a Hugging Face data set
(`hf:org/name`, or a `save_to_disk` folder, recognized by its files); or `synthetic:arithmetic/<part>` for the
demo. JSONL, JSON and CSV files may be compressed with gzip or zstd (`.jsonl.gz`, `.jsonl.zst`; a compressed
file is also recognized by its first bytes whatever its name or `format`). JSONL, Parquet, CSV and Hugging Face
data sets stream in batches; a JSON array file is parsed whole (use JSONL or Parquet for big data).

Fingerprints (the source's part of the prepare_data cache key) come from metadata that changes when the
content does: a local file's SHA-256, computed once and remembered by path, size and modification time
(as git's index does); an object store's ETag or version id; a Hub data set's resolved commit.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import Field

from tasks.machinery.fingerprints import DataError, _folder_digest, _object_digest, file_digest, resolve_hub_revision
from tasks.machinery.training import Section

Format = Literal["auto", "jsonl", "json", "parquet", "csv", "hf"]


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
        return re.sub(r"\.(jsonl|ndjson|json|parquet|csv)(\.gz|\.zst|\.zstd)?$", "", name.rsplit("/", 1)[-1]) or name

logger = logging.getLogger("posttrain")
BATCH_ROWS = 2_000
FILE_FORMATS = ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet"),
                (".csv", "csv"))
COMPRESSIONS = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}  # by magic bytes
COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zst", ".zstd")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def format_of(source: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    if source.startswith("synthetic:"):
        return "synthetic"
    if source.startswith("hf:"):
        return "hf"
    name = source.split("?")[0].lower()
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    for ext, fmt in FILE_FORMATS:
        if name.endswith(ext):
            return fmt
    if Path(source).is_dir():
        if any((Path(source) / f).exists() for f in SAVED_DATASET_FILES):
            return "hf"
        raise DataError(f"{source}: a folder, and not one `datasets.save_to_disk` wrote (it would hold "
                        f"{' or '.join(SAVED_DATASET_FILES)}); name the data file itself (JSONL, JSON, Parquet, CSV, "
                        "optionally .gz/.zst), or list several files as a mixture")
    if "://" in source or Path(source).exists() or source.startswith(("/", ".")):
        raise DataError(f"{source}: cannot tell the format from the extension; set `format` (jsonl, json, parquet, "
                        "csv, hf)")
    return "hf"


# ---- reading ---------------------------------------------------------------------------------


def read_batches(src, revision: str | None = None, batch_rows: int = BATCH_ROWS,
                 raw_lines: bool = False) -> Iterator[list[tuple[int, Any]]]:
    """Batches of (row number, record): 1-based lines for JSONL, 1-based records otherwise. `revision` pins
    a Hub data set to the commit its fingerprint resolved. With `raw_lines`, a JSONL source yields its lines
    as bytes, unparsed and not renamed (`parse_line` and `rename` do that where the work is spread out)."""
    fmt = format_of(src.source, src.format)
    if fmt == "synthetic":
        from tasks.machinery import synthetic

        part, params = synthetic.parse_source(src.source)
        batches = _chunks(enumerate(synthetic.generate(part, **params), start=1), batch_rows)
    elif fmt == "hf":
        batches = _hf_batches(src, revision, batch_rows)
    elif fmt == "jsonl":
        batches = _jsonl_batches(src.source, batch_rows, raw_lines)
        if raw_lines:
            yield from batches
            return
    elif fmt == "json":
        batches = _chunks(enumerate(_read_json(src.source), start=1), batch_rows)
    elif fmt == "parquet":
        batches = _parquet_batches(src.source, batch_rows)
    else:
        batches = _csv_batches(src.source, batch_rows)
    for batch in batches:
        yield rename(src.columns, batch)


def read_rows(src) -> list[tuple[int, Any]]:
    """Every row of a small source at once (tests, the pretrain corpus)."""
    return [row for batch in read_batches(src) for row in batch]


def _chunks(rows, size: int):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _open(uri: str, decompress: bool = True):
    """The file's bytes; gzip or zstd content (told by its first bytes) decompressed on the fly."""
    import fsspec

    try:
        f = fsspec.open(uri, "rb").open()
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None
    if not decompress:
        return f
    magic = f.read(4)
    f.seek(0)
    compression = next((c for m, c in COMPRESSIONS.items() if magic.startswith(m)), None)
    if compression is None:
        return f
    f.close()
    import io

    return io.BufferedReader(fsspec.open(uri, "rb", compression=compression).open())  # zstd's reader has no lines


def _jsonl_batches(uri: str, batch_rows: int, raw_lines: bool):
    batch = []
    with _open(uri) as f:
        for number, line in enumerate(f, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark, as Windows editors write
            if not line.strip():
                continue
            batch.append((number, line if raw_lines else parse_line(uri, number, line)))
            if len(batch) == batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch


def parse_line(uri: str, number: int, line: bytes):
    """One JSONL line (CRLF line ends are whitespace to JSON); errors name the file and line."""
    import orjson

    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise _line_error(uri, number, line, e) from None


def _line_error(uri: str, number: int, line: bytes, error) -> DataError:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(f"{uri}: line {number}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(f"{uri}: line {number}: malformed JSON ({e.msg} at column {e.colno})")
    return DataError(f"{uri}: line {number}: malformed JSON ({error})")


def _read_json(uri: str) -> list:
    with _open(uri) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{uri}: line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{uri}: expected a JSON array of records (or one key holding such an array)")
    return data


def _parquet_batches(uri: str, batch_rows: int):
    import pyarrow.parquet as pq

    with _open(uri, decompress=False) as f:
        try:
            reader = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for an unreadable file
            raise DataError(f"{uri}: cannot read as parquet: {e}") from None
        number = 1
        for record_batch in reader.iter_batches(batch_size=batch_rows):
            rows = record_batch.to_pylist()
            yield list(enumerate(rows, start=number))
            number += len(rows)


def _csv_batches(uri: str, batch_rows: int):
    import pandas as pd

    with _open(uri) as f:
        try:
            number = 1
            for frame in pd.read_csv(f, chunksize=batch_rows):
                rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
                        for r in frame.to_dict(orient="records")]  # an empty cell reads as NaN
                yield list(enumerate(rows, start=number))
                number += len(rows)
        except UnicodeDecodeError as e:
            raise DataError(f"{uri}: not valid UTF-8 ({e.reason})") from None
        except pd.errors.ParserError as e:
            raise DataError(f"{uri}: cannot read as csv: {e}") from None


def _hf_batches(src, revision: str | None, batch_rows: int):
    import datasets

    name = src.source.removeprefix("hf:")
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
            ds = ds[src.split] if isinstance(ds, datasets.DatasetDict) else ds
        elif Path(name).is_dir() and Path(name, "dataset_dict.json").exists():
            ds = datasets.load_from_disk(name)[src.split]
        else:
            ds = datasets.load_dataset(name, split=src.split, revision=revision or src.revision)
    except Exception as e:
        raise DataError(f"{src.source}: cannot load Hugging Face data set: {e}") from None
    number = 1
    for columns in ds.iter(batch_size=batch_rows):
        keys = list(columns)
        rows = [dict(zip(keys, values)) for values in zip(*(columns[k] for k in keys))]
        yield list(enumerate(rows, start=number))
        number += len(rows)


def rename(columns: dict[str, str], rows: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    if not columns:
        return rows
    return [(n, {columns.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r) for n, r in rows]


# ---- fingerprints ----------------------------------------------------------------------------


def fingerprint(src) -> dict:
    """{digest[, revision]} of what a source holds, from metadata where it can be trusted; never a second
    read of an unchanged local file. A Hub data set resolves to its commit (recorded with the run)."""
    from tasks.machinery.store import digest_json

    fmt = format_of(src.source, src.format)
    if fmt == "synthetic":
        from tasks.machinery import synthetic

        part, params = synthetic.parse_source(src.source)
        return {"digest": digest_json({"synthetic": part, **params})}  # generated by code the cache key covers
    if fmt == "hf":
        name = src.source.removeprefix("hf:")
        if Path(name).exists():
            return {"digest": _folder_digest(Path(name))}
        revision = resolve_hub_revision(name, src.revision, "dataset")
        return {"digest": digest_json({"hf": name, "split": src.split, "revision": revision}), "revision": revision}
    if "://" not in src.source or src.source.startswith("file://"):
        path = Path(src.source.removeprefix("file://"))
        if not path.is_file():
            raise DataError(f"{src.source}: file not found")
        return {"digest": file_digest(path)}
    return {"digest": _object_digest(src.source)}
