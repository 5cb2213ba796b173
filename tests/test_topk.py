"""Streamed top-k over the store's files equals in-memory scoring; float16 and int8 indexes; the Attributor
switches to streaming past its memory cap and returns the same attributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from das_sd.score import LambdaRule, build_index, rank_scores, raw_scores, train_vectors
from das_sd.store import FeatureStore, Row
from das_sd.topk import stream_topk


@pytest.fixture()
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, k = 300, 24
    s = FeatureStore.create(tmp_path / "store", {"test": 1}, shard_size=64)
    for start in range(0, n, 64):
        m = min(64, n - start)
        rows = [Row(f"k{i}", f"img{i}.png", f"c{i}") for i in range(start, start + m)]
        s.append_shard(rows, {"features.das": torch.randn(m, k, generator=g),
                              "residuals.das": torch.rand(m, generator=g) + 0.5})
    build_index(s, "das", LambdaRule(rho=0.1))
    return s


def assert_streamed_equals_in_memory(store, name: str, q: torch.Tensor, chunk_rows: int):
    score, sign = rank_scores(name, raw_scores(q, train_vectors(store, name)))
    expected = torch.topk(score, 10, dim=1)
    got = stream_topk(store, name, q, top_k=10, chunk_rows=chunk_rows)
    assert torch.equal(got.indices, expected.indices)
    assert torch.allclose(got.scores, expected.values, rtol=1e-5)
    assert torch.equal(got.signs, sign.gather(1, expected.indices))
    return got


@pytest.mark.parametrize("name", ["das", "das-signed", "das-noleverage", "tracin"])
@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_streamed_topk_equals_in_memory_topk(store, name, chunk_rows):
    q = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    got = assert_streamed_equals_in_memory(store, name, q, chunk_rows)
    # brute force, one row at a time in float64
    psi = train_vectors(store, name).double()
    t = torch.stack([q.double() @ psi[i] for i in range(len(psi))], dim=1)
    brute = (t ** 2 if name in ("das", "das-noleverage") else t).argsort(dim=1, descending=True)[:, :10]
    assert torch.equal(got.indices, brute)


def test_index_has_one_file_per_shard_and_a_rebuild_replaces_it(store):
    first = sorted(p.name for p in store.root.glob("index-das-*.safetensors"))
    assert len(first) == len(store.manifest["shards"]) == 5
    build_index(store, "das", LambdaRule(rho=0.1))
    second = sorted(p.name for p in store.root.glob("index-das-*.safetensors"))
    assert len(second) == 5 and not set(first) & set(second)  # new generation, old files removed


def test_float16_index_halves_the_bytes_and_keeps_the_ranking(store):
    q = torch.randn(20, 24, generator=torch.Generator().manual_seed(2))
    full = stream_topk(store, "das", q, top_k=10)
    size32 = sum(p.stat().st_size for p in store.root.glob("index-das-*.safetensors"))
    info = build_index(store, "das", LambdaRule(rho=0.1), dtype=torch.float16)
    assert info["dtype"] == "float16" and train_vectors(store, "das").dtype == torch.float16
    size16 = sum(p.stat().st_size for p in store.root.glob("index-das-*.safetensors"))
    assert size16 < 0.7 * size32  # the psi arrays halve; leverage and residuals stay float32
    half = stream_topk(store, "das", q, top_k=10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(full.indices.tolist(), half.indices.tolist())])
    assert overlap >= 0.9
    assert torch.allclose(half.scores, full.scores, rtol=2e-2)


@pytest.mark.parametrize("chunk_rows,int8_gemm", [(7, True), (1000, True), (7, False)])
def test_int8_index_quarters_the_vectors_and_stays_within_its_error_bound(store, chunk_rows, int8_gemm, monkeypatch):
    if not int8_gemm:  # the bfloat16 path taken where torch has no int8 matrix product
        def missing(*args):
            raise RuntimeError("no int8 GEMM here")
        monkeypatch.setattr(torch, "_int_mm", missing)
    q = torch.randn(20, 24, generator=torch.Generator().manual_seed(4))
    exact = {name: raw_scores(q, train_vectors(store, name)).double() for name in ("das", "das-signed", "das-noleverage")}
    size32 = sum(p.stat().st_size for p in store.root.glob("index-das-*.safetensors"))
    info = build_index(store, "das", LambdaRule(rho=0.1), dtype=torch.int8)
    index = store.load_index("das")
    assert info["dtype"] == "int8" and index["psi_das"].dtype == torch.int8
    size8 = sum(p.stat().st_size for p in store.root.glob("index-das-*.safetensors"))
    assert size8 < 0.45 * size32  # psi quarters; scales, norms, leverage and residuals stay float32
    for name, t32 in exact.items():
        # rounding moves each coordinate by at most scale_i / 2: |t8 - t| <= ||q|| scale_i sqrt(k) / 2
        array = "psi_das_noleverage" if name == "das-noleverage" else "psi_das"
        scale = index[f"scale.{array}"].double()
        t8 = q.double() @ (index[array].double() * scale.unsqueeze(1)).T
        bound = q.double().norm(dim=1, keepdim=True) * scale * 24 ** 0.5 / 2
        assert ((t8 - t32).abs() <= bound * (1 + 1e-6) + 1e-9).all()
        assert ((t8 - t32).abs() > 0).any()  # it is approximate
        # streamed scoring over the int8 files equals in-memory scoring of the same int8 index
        assert_streamed_equals_in_memory(store, name, q, chunk_rows)


def test_attributor_streams_past_its_memory_cap_with_the_same_results(demo):
    from das_sd.attribute import Attributor

    in_memory = Attributor(demo["store"])
    streaming = Attributor(demo["store"], pipe=in_memory.pipe, max_in_memory_bytes=0)
    assert not in_memory.streams("das") and streaming.streams("das")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for name in ("das", "dtrak", "tracin"):
        a = in_memory.attribute_latents(latents, "zorblat, a red circle on a blue background", name, top_k=8)[0]
        b = streaming.attribute_latents(latents, "zorblat, a red circle on a blue background", name, top_k=8)[0]
        assert [r.key for r in a.results] == [r.key for r in b.results]
        assert np.allclose([r.score for r in a.results], [r.score for r in b.results], rtol=1e-4)
        assert [r.sign for r in a.results] == [r.sign for r in b.results]
    assert "das" not in streaming._train  # nothing was loaded whole
