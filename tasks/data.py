"""`prepare_data` stage: read, normalize, validate, deduplicate, filter and split the recipe's data sets.

Sources: a local path or fsspec URI (s3://...) to JSONL, JSON, Parquet or CSV; a Hugging Face data set
name (`hf:org/name` or a name that is not a path); or `synthetic:arithmetic/<part>` for the demo.

Every row is normalized to the conversational shapes TRL's trainers read:

  sft          prompt: [messages], completion: [assistant message]
  preference   prompt: [messages], chosen: [assistant message], rejected: [assistant message]
  unpaired     prompt: [messages], completion: [assistant message], label: bool
  eval         prompt: [messages], reference: str | None
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tasks.kinds import StageKind
from tasks.store import digest_json
from tasks.training import Section

KINDS = ("sft", "preference", "unpaired", "eval")
Format = Literal["auto", "jsonl", "json", "parquet", "csv", "hf"]


class DataError(ValueError):
    """A data set cannot be used; the message names the source, the row and the problem."""


class DatasetSource(Section):
    source: str = Field(description="Path, fsspec URI (s3://...), `hf:<name>` or `synthetic:arithmetic/<part>`.")
    format: Format = Field("auto", description="File format; 'auto' decides by the file extension.")
    split: str = Field("train", description="Split to read when the source is a Hugging Face data set.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns before normalizing, e.g. {question: prompt}."
    )


class DataConfig(Section):
    sft: DatasetSource | None = Field(None, description="Demonstrations: prompt/completion or chat `messages`.")
    preference: DatasetSource | None = Field(None, description="Preference pairs: prompt, chosen, rejected.")
    unpaired: DatasetSource | None = Field(None, description="Unpaired feedback: prompt, completion, label (bool).")
    eval: DatasetSource | None = Field(
        None, description="Held-out prompts for the evaluate stage, with an optional `reference` answer."
    )
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of each training set held out.")
    max_chars: int = Field(4000, ge=1, description="Drop rows whose prompt plus response is longer (characters).")
    dedup: bool = Field(True, description="Drop exact duplicate rows (after normalization).")

    def sources(self) -> dict[str, DatasetSource]:
        return {kind: getattr(self, kind) for kind in KINDS if getattr(self, kind) is not None}


# ---- reading ---------------------------------------------------------------------------------


def _format_of(src: DatasetSource) -> str:
    if src.format != "auto":
        return src.format
    if src.source.startswith("synthetic:"):
        return "synthetic"
    if src.source.startswith("hf:"):
        return "hf"
    name = src.source.split("?")[0].lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet"),
                     (".csv", "csv")):
        if name.endswith(ext):
            return fmt
    if "://" in src.source or Path(src.source).exists() or src.source.startswith(("/", ".")):
        raise DataError(f"{src.source}: cannot tell the format from the extension; set `format`")
    return "hf"


def _open_bytes(uri: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None


def source_fingerprint(src: DatasetSource) -> str:
    """Digest of what a source holds, taken before the stage runs: it goes into the stage's cache key."""
    fmt = _format_of(src)
    if fmt == "synthetic":
        from tasks import synthetic

        part, params = synthetic.parse_source(src.source)
        return digest_json(synthetic.generate(part, **params))
    if fmt == "hf":
        name = src.source.removeprefix("hf:")
        if Path(name).exists():
            return _path_fingerprint(Path(name))
        return digest_json({"hf": name, "split": src.split})
    return hashlib.sha256(_open_bytes(src.source)).hexdigest()


def _path_fingerprint(path: Path) -> str:
    from tasks.store import content_digest, directory_manifest

    return content_digest(directory_manifest(path)) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


def read_rows(src: DatasetSource) -> list[tuple[int, dict]]:
    """(row number, record) pairs; row numbers are 1-based lines for JSONL, 1-based records otherwise."""
    fmt = _format_of(src)
    if fmt == "synthetic":
        from tasks import synthetic

        part, params = synthetic.parse_source(src.source)
        records = synthetic.generate(part, **params)
    elif fmt == "hf":
        records = _read_hf(src)
    else:
        raw = _open_bytes(src.source)
        try:
            text = raw.decode("utf-8") if fmt in ("jsonl", "json") else None
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"{src.source}: line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if fmt == "jsonl":
            return _rename(src, _read_jsonl(src.source, text))
        if fmt == "json":
            records = _read_json(src.source, text)
        else:
            records = _read_table(src.source, raw, fmt)
    return _rename(src, list(enumerate(records, start=1)))


def _read_jsonl(name: str, text: str) -> list[tuple[int, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: line {number}: malformed JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_json(name: str, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON array of records (or one key holding such an array)")
    return data


def _read_table(name: str, raw: bytes, fmt: str) -> list[dict]:
    import pandas as pd

    try:
        frame = pd.read_parquet(io.BytesIO(raw)) if fmt == "parquet" else pd.read_csv(io.BytesIO(raw))
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 ({e.reason})") from None
    except Exception as e:  # pyarrow and pandas raise many types for unreadable files
        raise DataError(f"{name}: cannot read as {fmt}: {e}") from None
    return [_to_plain(r) for r in frame.to_dict(orient="records")]


def _to_plain(value):
    if hasattr(value, "tolist"):
        return _to_plain(value.tolist())
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN from an empty CSV cell
        return None
    return value


def _read_hf(src: DatasetSource) -> list[dict]:
    import datasets

    name = src.source.removeprefix("hf:")
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
            ds = ds[src.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=src.split)
    except Exception as e:
        raise DataError(f"{src.source}: cannot load Hugging Face data set: {e}") from None
    return [_to_plain(r) for r in ds]


def _rename(src: DatasetSource, rows: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    if not src.columns:
        return rows
    return [(n, {src.columns.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r) for n, r in rows]


# ---- normalizing -----------------------------------------------------------------------------


def _text(record: dict, field: str, where: str, allow_empty: bool = False) -> str:
    if field not in record or record[field] is None:
        raise DataError(f"{where}: field '{field}' is missing")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise DataError(f"{where}: field '{field}' is empty")
    return value


def _messages(value, field: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: {field}[{i}] has unknown role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(record: dict, where: str) -> list[dict]:
    value = record.get("prompt")
    if isinstance(value, list):
        return _messages(value, "prompt", where)
    return [{"role": "user", "content": _text(record, "prompt", where)}]


def _reply(record: dict, field: str, where: str, allow_empty: bool = False) -> list[dict]:
    value = record.get(field)
    if isinstance(value, list):
        msgs = _messages(value, field, where)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{field}' must end with an assistant message")
        return msgs
    return [{"role": "assistant", "content": _text(record, field, where, allow_empty)}]


def normalize(kind: str, record: Any, where: str) -> dict:
    """One record in its canonical shape, or a DataError naming the row and field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if kind == "sft":
        if "messages" in record and "prompt" not in record:
            msgs = _messages(record["messages"], "messages", where)
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None or last == 0:
                raise DataError(f"{where}: field 'messages' needs a user turn followed by an assistant turn")
            return {"prompt": msgs[:last], "completion": [msgs[last]]}
        return {"prompt": _prompt(record, where), "completion": _reply(record, "completion", where)}
    if kind == "preference":
        return {  # an empty rejected reply is real data: a model that says nothing, ranked below an answer
            "prompt": _prompt(record, where),
            "chosen": _reply(record, "chosen", where),
            "rejected": _reply(record, "rejected", where, allow_empty=True),
        }
    if kind == "unpaired":
        label = record.get("label")
        if isinstance(label, str) and label.lower() in ("true", "false", "1", "0"):
            label = label.lower() in ("true", "1")
        elif isinstance(label, int) and label in (0, 1):
            label = bool(label)
        if not isinstance(label, bool):
            raise DataError(f"{where}: field 'label' must be a boolean (true = desirable), got {label!r}")
        return {"prompt": _prompt(record, where), "completion": _reply(record, "completion", where), "label": label}
    if kind == "eval":
        reference = record.get("reference")
        if reference is not None and not isinstance(reference, (str, int, float)):
            raise DataError(f"{where}: field 'reference' must be a string, got {type(reference).__name__}")
        return {"prompt": _prompt(record, where), "reference": None if reference is None else str(reference)}
    raise ValueError(f"unknown data kind {kind}")


def _chars(row: dict) -> int:
    return sum(len(m["content"]) for field in ("prompt", "completion", "chosen", "rejected") for m in row.get(field, []))


def _goes_to_eval(row: dict, seed: int, fraction: float) -> bool:
    """Split by a hash of the row itself: stable when other rows are added or removed."""
    h = hashlib.sha256(f"{seed}:{json.dumps(row, sort_keys=True)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def prepare_data(cfg: DataConfig, out: Path, seed: int) -> dict[str, float]:
    """Write <kind>/train.jsonl and <kind>/eval.jsonl per configured data set, plus stats.json."""
    if not cfg.sources():
        raise DataError("data: no data set configured (set data.sft, data.preference, data.unpaired or data.eval)")
    stats: dict[str, dict] = {}
    for kind, src in cfg.sources().items():
        rows_in = read_rows(src)
        if not rows_in:
            raise DataError(f"{src.source}: the data set is empty")
        seen: set[str] = set()
        kept, duplicates, too_long = [], 0, 0
        for number, record in rows_in:
            row = normalize(kind, record, f"{src.source}: row {number}")
            if kind != "eval" and _chars(row) > cfg.max_chars:
                too_long += 1
                continue
            fingerprint = json.dumps(row, sort_keys=True)
            if cfg.dedup and fingerprint in seen:
                duplicates += 1
                continue
            seen.add(fingerprint)
            kept.append(row)
        if not kept:
            raise DataError(
                f"{src.source}: no usable rows left ({len(rows_in)} read, {duplicates} duplicates, "
                f"{too_long} longer than data.max_chars={cfg.max_chars})"
            )
        if kind == "eval":
            splits = {"test": kept}
        else:
            splits = {"train": [], "eval": []}
            for row in kept:
                splits["eval" if _goes_to_eval(row, seed, cfg.eval_fraction) else "train"].append(row)
            if not splits["train"]:
                raise DataError(f"{src.source}: every row went to the eval split; lower data.eval_fraction")
        (out / kind).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(out / kind / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        stats[kind] = {
            "source": src.source,
            "rows_read": len(rows_in),
            "duplicates_removed": duplicates,
            "too_long_removed": too_long,
            **{f"{split}_rows": len(rows) for split, rows in splits.items()},
            "mean_chars": sum(map(_chars, kept)) / len(kept),
        }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return {f"{kind}/{k}": float(v) for kind, s in stats.items() for k, v in s.items() if isinstance(v, (int, float))}


def load_split(data_dir: Path, kind: str, split: str):
    """A prepared split as a datasets.Dataset (empty file -> None)."""
    from datasets import Dataset

    path = data_dir / kind / f"{split}.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return Dataset.from_list(rows) if rows else None


# ---- stage kind ------------------------------------------------------------------------------


def _work(cfg: DataConfig, inputs: dict, out: Path, ctx) -> dict[str, float]:
    metrics = prepare_data(cfg, out, ctx.seed)
    from tasks import tracking
    from tasks.store import sha256_file

    for path in sorted(out.glob("*/*.jsonl")):
        tracking.log_dataset(ctx.env.tracking_uri, ctx.run_id, path, f"{path.parent.name}-{path.stem}",
                             sha256_file(path), context=path.stem)
    return metrics


def source_refs(cfg: DataConfig) -> dict[str, dict]:
    """The recipe's data sources as stage inputs: their fingerprints key the prepare_data stage."""
    return {kind: {"uri": src.source, "digest": source_fingerprint(src), "kind": "source"}
            for kind, src in cfg.sources().items()}


KIND = StageKind(
    name="prepare_data",
    description="Read, normalize, validate, deduplicate and split the data sets it names.",
    config=DataConfig,
    inputs={},
    output="data",
    work=_work,
    headline=("sft/train_rows", "preference/train_rows", "unpaired/train_rows", "eval/test_rows"),
    provides=lambda cfg: set(cfg.sources()),
    source_inputs=source_refs,
)
