"""Prepared data as every stage reads it: the Parquet splits a `prepare_data` stage writes (layout in
tasks/kinds/prepare_data.py), their schema, loading one as a datasets.Dataset, and recording it on the stage's MLflow run.
Kinds read prepared data through this module, never through the `prepare_data` kind itself, so a kind's cache
key covers how data is read, not how it is prepared."""

from __future__ import annotations

from pathlib import Path

BOOKKEEPING = ("task", "source", "row")


def schema(kind: str, tools: bool = True, weights: bool = True):
    """A kind's columns; without `tools` and `weights`, messages are plain {role, content} (what every chat
    template reads); `weight` (0: a context turn, never trained) is kept when a row has one."""
    import pyarrow as pa

    call = pa.struct([("type", pa.string()),
                      ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())] + (
        [("tool_calls", pa.list_(call)), ("tool_call_id", pa.string()), ("name", pa.string())] if tools else []) + (
        [("weight", pa.int8())] if weights else [])))
    fields = {
        "sft": [("prompt", message), ("completion", message), ("tools", pa.string())],
        "preference": [("prompt", message), ("chosen", message), ("rejected", message), ("tools", pa.string())],
        "unpaired": [("prompt", message), ("completion", message), ("label", pa.bool_())],
        "eval": [("prompt", message), ("reference", pa.string())],
        "text": [("text", pa.string())],
    }[kind]
    fields = [f for f in fields if tools or f[0] != "tools"]
    return pa.schema(fields + [("task", pa.string()), ("source", pa.int32()), ("row", pa.int64())])


def rows_table(rows: list[dict], columns):
    """`rows` (dicts) as an Arrow table of schema `columns`, built column by column: the same table as
    `pa.Table.from_pylist`, about 2.5x faster for lists of message structs (the data stage writes every row once)."""
    import pyarrow as pa

    return pa.Table.from_arrays([_column([row.get(f.name) for row in rows], f.type) for f in columns],
                                schema=columns)


def _column(values: list, type_):
    import pyarrow as pa

    if not (pa.types.is_list(type_) and pa.types.is_struct(type_.value_type)):
        return pa.array(values, type=type_)
    offsets, items, missing = [0], [], []
    for value in values:
        if value is not None:
            items.extend(value)
        offsets.append(len(items))
        missing.append(value is None)
    item_type = type_.value_type
    structs = pa.StructArray.from_arrays([_column([item.get(f.name) for item in items], f.type) for f in item_type],
                                         fields=list(item_type))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs, type=type_,
                                    mask=pa.array(missing) if any(missing) else None)


def split_files(data_dir: Path, kind: str, split: str) -> list[Path]:
    return sorted((Path(data_dir) / kind).glob(f"{split}-*.parquet"))


def load_split(data_dir: Path, kind: str, split: str, keep_tags: bool = False):
    """A prepared split as a datasets.Dataset (Arrow, memory-mapped), or None when there is none. The
    bookkeeping columns (source, row; and task unless `keep_tags`) are left out."""
    import datasets

    files = split_files(data_dir, kind, split)
    if not files:
        return None
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a bar per load says nothing the stage's own lines do not
    try:
        ds = datasets.Dataset.from_parquet([str(f) for f in files])
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()
    if len(ds) == 0:
        return None
    dropped = [c for c in BOOKKEEPING + ("provenance",)  # provenance: a synthesize stage's per-row record
               if c in ds.column_names and not (keep_tags and c == "task")]
    return ds.remove_columns(dropped)


def log_data_split(ctx, data: Path, kind: str, split: str = "train", context: str = "training") -> None:
    """Record the split a stage reads (trains on, or evaluates on) as an MLflow dataset input of its run."""
    import json

    from tasks.machinery import tracking

    rows = json.loads((data / "stats.json").read_text())[kind][f"{split}_rows"]
    tracking.log_dataset(ctx.env.tracking_uri, ctx.run_id, split_files(data, kind, split), f"{kind}-{split}", rows,
                         context)
