"""Corpus files in Arrow formats: Parquet files, and Hugging Face `datasets` folders or `.arrow` files.

One row is one document; its text is the string column `--text-field`. Both are read a batch of
rows at a time (Parquet through `ParquetFile.iter_batches` with buffered column-chunk reads, a
`datasets` table memory-mapped and iterated in batches), so memory follows the batch, not the
file. Every file's schema is checked when the corpus is resolved, before any stage writes output:
a missing or non-string column, or a file whose footer does not parse, is an MLSMError there.
`datasets` is an optional extra, imported only when such a corpus is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mlsm.core.errors import MLSMError

PARQUET = ".parquet"
ARROW = ".arrow"
# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in their folder.
DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"

# Rows per batch: a few MB of text at typical document sizes (the batch is held twice, as Arrow and
# as Python strings), large enough that Arrow's per-batch overhead vanishes next to the per-line work.
BATCH_ROWS = 256
# Parquet column chunks are read through a buffer of this size instead of whole (and not pre-buffered,
# pyarrow's default): a file written as one row group (common) would otherwise be held in memory
# compressed while it is decoded (15 MB instead of 5 MB of Arrow allocations for a 34 MB column).
PARQUET_BUFFER = 1 << 20

_INSTALL = "pip install mlsm[datasets]"


def is_dataset_folder(path: Path) -> bool:
    """A `save_to_disk` folder: one Dataset (state.json) or a DatasetDict of them (dataset_dict.json)."""
    return (path / DATASET_STATE).is_file() or (path / DATASET_DICT).is_file()


def dataset_split(folder: Path) -> Path:
    """The Dataset folder a `save_to_disk` folder stands for: itself, or a DatasetDict's only split."""
    if (folder / DATASET_STATE).is_file():
        return folder
    try:
        splits = json.loads((folder / DATASET_DICT).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MLSMError(f"{folder / DATASET_DICT} is unreadable ({e}); the datasets folder {folder} may be "
                        "damaged. Save it again with save_to_disk.") from e
    if len(splits) != 1:
        names = ", ".join(map(str, splits)) or "none"
        raise MLSMError(f"{folder} is a datasets DatasetDict with the splits {names}: say which one to read by "
                        f"pointing --corpus at its folder, e.g. {folder / str(splits[0] if splits else 'train')}.")
    return folder / str(splits[0])


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    string_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or string_view(t)


def check_text_column(where: str, schema: pa.Schema, field: str) -> None:
    """The schema has a string column `field`, or an MLSMError naming the columns / the type there is."""
    if field not in schema.names:
        cols = ", ".join(repr(n) for n in schema.names) or "none"
        raise MLSMError(f"{where} has no column {field!r} (its columns: {cols}). Pass --text-field with the "
                        "name of the column that holds the text.")
    t = schema.field(field).type
    if not _is_text_type(t):
        raise MLSMError(f"{where}: the column {field!r} holds {t}, not strings. Pass --text-field with the name "
                        "of a string column that holds the text.")


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, buffer_size=PARQUET_BUFFER, pre_buffer=False)
    except PermissionError:
        raise  # reported by the caller's readability check, in its words
    except (pa.ArrowException, OSError) as e:
        raise MLSMError(f"{path} is not a readable Parquet file ({e}); it may be truncated or corrupt. "
                        "Fix or remove it.") from e


def check_parquet(path: Path, field: str) -> None:
    with _open_parquet(path) as f:
        check_text_column(str(path), f.schema_arrow, field)


def parquet_texts(path: Path, field: str, batch_rows: int | None = None) -> Iterator[pa.Array]:
    """The text column of a Parquet file, one batch of rows at a time, in row order."""
    with _open_parquet(path) as f:
        for batch in f.iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=[field], use_threads=False):
            yield batch.column(0)


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise MLSMError(f"reading a Hugging Face datasets corpus needs the `datasets` package: {_INSTALL}") from e
    return datasets


def _load_dataset(path: Path):
    """A memory-mapped Dataset of a split folder or a bare .arrow file (nothing is read into memory)."""
    datasets = _datasets()
    what = "datasets .arrow file" if path.is_file() else "datasets folder"
    try:
        if path.is_file():
            return datasets.Dataset.from_file(str(path), in_memory=False)
        return datasets.load_from_disk(str(path), keep_in_memory=False)
    except PermissionError:
        raise
    except Exception as e:  # datasets raises many kinds (ArrowInvalid, FileNotFoundError, JSONDecodeError, ...)
        raise MLSMError(f"{path} is not a readable {what} ({type(e).__name__}: {e}); it may be truncated or "
                        "corrupt. Save it again with save_to_disk, or remove it.") from e


def check_dataset(path: Path, field: str) -> None:
    ds = _load_dataset(path)
    if not isinstance(ds, _datasets().Dataset):
        raise MLSMError(f"{path} holds a {type(ds).__name__}, not one Dataset: point --corpus at one split's folder.")
    check_text_column(str(path), ds.features.arrow_schema, field)


def dataset_texts(path: Path, field: str, batch_rows: int | None = None) -> Iterator[pa.ChunkedArray]:
    """The text column of a datasets split or .arrow file, one batch of rows at a time, in row order."""
    ds = _load_dataset(path).select_columns([field]).with_format("arrow")
    for table in ds.iter(batch_size=batch_rows or BATCH_ROWS):
        yield table.column(0)
