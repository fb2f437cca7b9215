import numpy as np
import pandas as pd
import pytest

from mlsm.core.errors import MLSMError
from mlsm.pipeline.shards import iter_shard_batches, list_shards, read_rows, shard_name, write_shard


def _shard(tmp_path, n=1000, d=8, layers=(2, 4)):
    rng = np.random.default_rng(0)
    seq = np.repeat(np.arange(n // 10), 10)
    pos = np.tile(np.arange(10), n // 10)
    tok = rng.integers(0, 30000, n)
    hidden = {l: rng.standard_normal((n, d)).astype(np.float16) for l in layers}
    path = tmp_path / shard_name(0)
    write_shard(path, seq, pos, tok, hidden, row_group_rows=300)
    return path, seq, pos, tok, hidden


def test_pandas_reads_a_shard(tmp_path):
    path, seq, pos, tok, hidden = _shard(tmp_path)
    df = pd.read_parquet(path)
    assert list(df.columns) == ["seq_id", "position", "token_id", "h2", "h4"]
    assert df["seq_id"].dtype == np.int64 and df["position"].dtype == np.int16 and df["token_id"].dtype == np.int32
    np.testing.assert_array_equal(np.stack(df["h4"].to_numpy()), hidden[4])
    np.testing.assert_array_equal(df["token_id"].to_numpy(), tok)


def test_streaming_by_row_group_returns_everything(tmp_path):
    path, seq, pos, tok, hidden = _shard(tmp_path)
    batches = list(iter_shard_batches(path, 2))
    assert len(batches) == 4  # 1000 rows in row groups of 300
    np.testing.assert_array_equal(np.concatenate([b["hidden"] for b in batches]), hidden[2])
    np.testing.assert_array_equal(np.concatenate([b["seq_id"] for b in batches]), seq)


def test_read_rows_across_row_groups(tmp_path):
    path, *_, hidden = _shard(tmp_path)
    rows = np.array([0, 5, 299, 300, 301, 999])
    np.testing.assert_array_equal(read_rows(path, 4, rows), hidden[4][rows])


def test_missing_layer_and_broken_file_are_user_errors(tmp_path):
    path, *_ = _shard(tmp_path)
    with pytest.raises(MLSMError, match="no layer 7"):
        next(iter_shard_batches(path, 7))
    broken = tmp_path / shard_name(1)
    broken.write_bytes(path.read_bytes()[:500])
    with pytest.raises(MLSMError, match="not a readable Parquet shard"):
        next(iter_shard_batches(broken, 2))
    assert list_shards(tmp_path) == [path, broken]
    assert not list(tmp_path.glob("*.tmp"))
