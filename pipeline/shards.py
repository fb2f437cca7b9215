"""The one Parquet shard format for hidden states: one row per token, read by every later stage.

Columns: seq_id int64, position int16, token_id int32, and h<l> fixed_size_list<float16>[d] per
extracted layer. Fixed-size lists keep `pandas.read_parquet` working while letting us read a
row group straight into an (n, d) numpy array without copies per row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlsm.core.errors import MLSMError
from mlsm.core.manifest import atomic_path

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.parquet"
ROW_GROUP_ROWS = 65536


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def layer_column(layer: int) -> str:
    return f"h{layer}"


def shard_schema(layers: list[int], d: int) -> pa.Schema:
    fields = [
        pa.field("seq_id", pa.int64()),
        pa.field("position", pa.int16()),
        pa.field("token_id", pa.int32()),
    ]
    fields += [pa.field(layer_column(l), pa.list_(pa.float16(), d)) for l in layers]
    return pa.schema(fields)


def write_shard(
    path: Path,
    seq_ids: np.ndarray,
    positions: np.ndarray,
    token_ids: np.ndarray,
    hidden: dict[int, np.ndarray],
    row_group_rows: int = ROW_GROUP_ROWS,
) -> None:
    """Write one shard atomically: readers never see a partial file under the final name."""
    layers = sorted(hidden)
    d = next(iter(hidden.values())).shape[1]
    cols = [
        pa.array(seq_ids.astype(np.int64)),
        pa.array(positions.astype(np.int16)),
        pa.array(token_ids.astype(np.int32)),
    ]
    for l in layers:
        h = np.ascontiguousarray(hidden[l], dtype=np.float16)
        if not np.isfinite(h).all():
            bad = int((~np.isfinite(h)).any(axis=1).sum())
            raise MLSMError(
                f"the auxiliary model produced NaN/Inf hidden states at layer {l} ({bad} of {len(h)} tokens of "
                f"{Path(path).name}; float16 overflows above 65504). Nothing of this shard was written. Check the "
                "model (its weights, or run it in float32 with --device cpu), then re-run `mlsm extract`."
            )
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), d))
    table = pa.Table.from_arrays(cols, schema=shard_schema(layers, d))
    # Float16 activations barely compress (~5% with zstd) but cost 10% of extraction time.
    compression = {"seq_id": "zstd", "position": "zstd", "token_id": "zstd"}
    compression.update({f"{layer_column(l)}.list.element": "none" for l in layers})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows, compression=compression,
                       use_dictionary=["seq_id", "position", "token_id"])


def shard_rows(path: Path) -> int | None:
    """Rows of a shard whose footer reads back, else None: how a resume tells a damaged shard from a finished one.

    Truncation always takes the footer (it is written last), so a shard that lost its end is caught.
    """
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        if Path(path).exists():
            log.warning("%s is damaged (%s); it will be extracted again", path, e)
        return None


def list_shards(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(SHARD_GLOB))


def open_shard(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise MLSMError(
            f"{path} is not a readable Parquet shard ({e}). Re-run `mlsm extract --force` to rebuild it."
        ) from e


def hidden_matrix(column: pa.ChunkedArray | pa.Array, d: int) -> np.ndarray:
    """(n, d) float16 view of a fixed_size_list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def iter_shard_batches(path: Path, layer: int) -> Iterator[dict[str, np.ndarray]]:
    """Stream one shard by row group: memory stays at one row group whatever the shard size."""
    pf = open_shard(path)
    col = layer_column(layer)
    if col not in pf.schema_arrow.names:
        have = [n for n in pf.schema_arrow.names if n.startswith("h")]
        raise MLSMError(f"{path} has no layer {layer} (columns {have}). Extract it with `mlsm extract --layers {layer}`.")
    d = pf.schema_arrow.field(col).type.list_size
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=["seq_id", "position", "token_id", col])
        yield {
            "seq_id": t.column("seq_id").to_numpy(),
            "position": t.column("position").to_numpy(),
            "token_id": t.column("token_id").to_numpy(),
            "hidden": hidden_matrix(t.column(col), d),
        }


def read_rows(path: Path, layer: int, rows: np.ndarray) -> np.ndarray:
    """Hidden states (float16) of the given sorted row numbers of one shard, reading only their row groups."""
    pf = open_shard(path)
    col = layer_column(layer)
    d = pf.schema_arrow.field(col).type.list_size
    out = []
    start = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        sel = rows[(rows >= start) & (rows < start + n)] - start
        if len(sel):
            h = hidden_matrix(pf.read_row_group(rg, columns=[col]).column(col), d)
            out.append(h[sel])
        start += n
    return np.concatenate(out) if out else np.zeros((0, d), np.float16)
