"""Chunked reads of a store's arrays (FeatureStore.array_chunks): every row of every file in order,
two buffers for a whole scan, the side arrays of low-precision indexes, files checked before the
first read, damaged headers refused naming the file."""

from __future__ import annotations

import pytest
import torch

from das_sd.score import LambdaRule, build_index
from das_sd.store import FeatureStore, Row, StoreError


@pytest.fixture()
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    s = FeatureStore.create(tmp_path / "store", {"test": 1}, shard_size=16)
    for start in range(0, 40, 16):
        m = min(16, 40 - start)
        s.append_shard([Row(f"k{i}", f"img{i}.png", f"c{i}") for i in range(start, start + m)],
                       {"features.das": torch.randn(m, 6, generator=g), "residuals.das": torch.rand(m, generator=g) + 0.5})
    return s


def scan(store, name, index=None, chunk_rows=None):
    """(rows read, concatenated blocks, distinct buffers the blocks lived in)."""
    parts, buffers, rows = [], set(), 0
    for reader in store.array_chunks(name, index, chunk_rows):
        for start, block in reader:
            assert start == sum(len(p) for p in parts) - rows  # chunks of a file come in row order
            buffers.add(block.untyped_storage().data_ptr())
            parts.append(block.clone())
        rows += reader.rows
    return rows, torch.cat(parts), buffers


@pytest.mark.parametrize("chunk_rows", [None, 1, 5, 16, 100])
def test_chunks_hold_every_row_in_order_in_two_buffers(store, chunk_rows):
    rows, got, buffers = scan(store, "features.das", chunk_rows=chunk_rows)
    assert rows == len(store) == 40
    assert torch.equal(got, store.load("features.das"))
    assert len(buffers) <= 2  # memory: two chunks, whatever the number of files and chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_index_chunks_and_side_arrays(store, dtype):
    build_index(store, "das", LambdaRule(rho=0.1), dtype=dtype)
    index = store.load_index("das")
    _, got, _ = scan(store, "psi_das", index="das", chunk_rows=7)
    assert got.dtype == dtype and torch.equal(got, index["psi_das"])
    side = {}
    for reader in store.array_chunks("psi_das", "das"):
        for kind, values in reader.side_arrays().items():
            side.setdefault(kind, []).append(values)
    expected = {kind: index[f"{kind}.psi_das"] for kind in ("norm", "scale") if f"{kind}.psi_das" in index}
    assert set(side) == set(expected) and (dtype == torch.float32 or "norm" in side) and (dtype != torch.int8 or "scale" in side)
    for kind, values in expected.items():
        assert torch.equal(torch.cat(side[kind]), values)


def test_every_file_is_checked_before_the_first_is_read(store):
    last = store.root / store.manifest["shards"][-1]["file"]
    data = bytearray(last.read_bytes())
    data[-3] ^= 1
    last.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"{last.name}: damaged shard"):
        store.array_chunks("features.das")  # refused on the call, before any chunk is handed out


def test_damaged_header_and_missing_array_are_refused_naming_the_file(store):
    store.manifest["checksums"].clear()  # as a store written before checksums: nothing refuses it earlier
    with pytest.raises(StoreError, match=r"features-00000\.safetensors: no array 'features\.trak'"):
        next(iter(store.array_chunks("features.trak")))
    first = store.root / store.manifest["shards"][0]["file"]
    data = bytearray(first.read_bytes())
    data[:8] = (len(data) * 1000).to_bytes(8, "little")  # a length field past the end of the file
    first.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"features-00000\.safetensors: cannot read it \(its header length field says"):
        next(iter(store.array_chunks("features.das")))
