"""FeatureStore mechanics: manifest identity, refusal with a readable diff, damage, append-only rows."""

from __future__ import annotations

import json

import pytest
import torch

from das_sd.store import FeatureStore, Row, StoreError


def _rows(n, start=0):
    return [Row(f"k{i}", f"img{i}.png", f"c{i}") for i in range(start, start + n)]


def test_append_and_read_back(tmp_path):
    s = FeatureStore.create(tmp_path / "s", {"lora": "a", "k": 4}, shard_size=3)
    blocks = s.plan(_rows(7))
    assert [len(b) for b in blocks] == [3, 3, 1]
    for b in blocks:
        s.append_shard(b, {"features.x": torch.arange(len(b) * 4, dtype=torch.float32).view(-1, 4) + int(b[0].key[1:])})
    again = FeatureStore.open(tmp_path / "s", {"lora": "a", "k": 4})
    assert again.keys() == [f"k{i}" for i in range(7)] and len(again) == 7
    assert again.load("features.x").shape == (7, 4)
    assert again.plan(_rows(9)) == [_rows(2, 7)]  # only the new rows are left to do
    assert [p.name for p in sorted((tmp_path / "s").glob("features-*.safetensors"))] == [
        "features-00000.safetensors", "features-00001.safetensors", "features-00002.safetensors"]


def test_mismatched_identity_is_refused_naming_each_difference(tmp_path):
    FeatureStore.create(tmp_path / "s", {"lora": "sha256:aaa", "sets": {"das": {"k": 2048}}})
    with pytest.raises(StoreError) as err:
        FeatureStore.open(tmp_path / "s", {"lora": "sha256:bbb", "sets": {"das": {"k": 512}}})
    message = str(err.value)
    assert "lora: store has 'sha256:aaa', requested 'sha256:bbb'" in message
    assert "sets.das.k: store has 2048, requested 512" in message


def test_missing_damaged_and_foreign_stores(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(StoreError, match="damaged manifest"):
        FeatureStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(StoreError, match="version 99"):
        FeatureStore.open(tmp_path)


def test_missing_or_damaged_shard_is_reported(tmp_path):
    s = FeatureStore.create(tmp_path / "s", {}, shard_size=2)
    s.append_shard(_rows(2), {"features.x": torch.zeros(2, 3)})
    (tmp_path / "s" / "features-00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="features-00000.safetensors: damaged shard"):
        s.load("features.x")
    (tmp_path / "s" / "features-00000.safetensors").unlink()
    with pytest.raises(StoreError, match="missing"):
        s.load("features.x")


def test_row_count_must_match(tmp_path):
    s = FeatureStore.create(tmp_path / "s", {})
    with pytest.raises(StoreError, match="rows"):
        s.append_shard(_rows(2), {"features.x": torch.zeros(3, 1)})
    assert not list((tmp_path / "s").glob("features-*"))
