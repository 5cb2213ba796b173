"""Streamed top-k over the store's files equals in-memory scoring; float16 and int8 indexes; the Attributor
switches to streaming past its memory cap and returns the same attributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from das_sd.registry import METHODS
from das_sd.score import LambdaRule, build_index, ranking, raw_scores, train_vectors
from das_sd.store import FeatureStore, Row
from das_sd.topk import stream_topk
from tolerances import U32, assert_ranked_up_to_rounding, float32_dot_bound, score_slack

pytestmark = pytest.mark.numerics


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


def assert_streamed_equals_in_memory(store, name: str, q: torch.Tensor, chunk_rows: int, error: torch.Tensor | None = None):
    """Streamed and in-memory scoring run other float32 matrix shapes: equal up to rounding.
    ``error`` (queries, 1): for low-precision files, the prefilter's bound on |t_approx - t| per unit
    row norm (topk.py), with which the rows it skips count in the credit total."""
    psi = train_vectors(store, name)
    score = ranking(name, raw_scores(q, psi))
    expected = torch.topk(score, 10, dim=1)
    got = stream_topk(store, name, q, top_k=10, chunk_rows=chunk_rows)
    slack = score_slack(name, q, psi)
    exact = ranking(name, q.double() @ psi.double().T)
    assert_ranked_up_to_rounding(got.indices, exact, slack)
    assert ((got.scores.double() - expected.values.double()).abs() <= 2 * slack).all()
    t = q.double() @ psi.double().T
    decided = t.gather(1, got.indices).abs() > float32_dot_bound(q.double(), psi.double()).gather(1, got.indices)
    assert torch.equal(got.signs[decided], torch.sign(t.gather(1, got.indices))[decided].to(got.signs.dtype))
    # the credit total of all N rows (the shares' denominator): each row's credit max(score, 0) is
    # off by at most its score's rounding (clipping is 1-Lipschitz), so the sum by at most N slack
    total = exact.clamp_min(0).sum(dim=1)
    bound = len(psi) * slack.squeeze(1)
    if error is not None:
        d = error * psi.double().norm(dim=1)
        bound = bound + (d * (2 * t.abs() + d) if METHODS[name].squared else d).sum(dim=1)
    assert ((got.credit_total - total).abs() <= bound).all()
    return got


@pytest.mark.parametrize("name", ["das", "das-signed", "das-noleverage", "tracin"])
@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_streamed_topk_equals_in_memory_topk(store, name, chunk_rows):
    q = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    got = assert_streamed_equals_in_memory(store, name, q, chunk_rows)
    # brute force, one row at a time in float64
    psi = train_vectors(store, name).double()
    t = torch.stack([q.double() @ psi[i] for i in range(len(psi))], dim=1)
    brute = t ** 2 if name in ("das", "das-noleverage") else t
    assert_ranked_up_to_rounding(got.indices, brute, score_slack(name, q, psi))


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
    # float16 storage moves each coordinate by at most 2^-11 relative; the j-th best score moves by
    # at most the largest change of any score (order statistics are 1-Lipschitz)
    psi16 = train_vectors(store, "das").double()  # |psi16| equals the float32 |psi| to 2^-11
    slack = score_slack("das", q, psi16, relative=2.0 ** -11 + U32)
    assert ((half.scores.double() - full.scores.double()).abs() <= slack).all()
    # rows the prefilter skipped count in the credit total with their float16 t: within
    # d_i = (2 u16 + k u32) |q| |psi_i| of t_i (topk.py), so t_i^2 within d_i (2 |t_i| + d_i)
    t16 = q.double() @ psi16.T
    d = (2 * 2.0 ** -11 + 24 * U32) * q.double().norm(dim=1, keepdim=True) * psi16.norm(dim=1) \
        + float32_dot_bound(q.double(), psi16)
    bound = (d * (2 * t16.abs() + d)).sum(dim=1)
    assert ((half.credit_total - t16.pow(2).sum(dim=1)).abs() <= bound).all()


@pytest.mark.parametrize("chunk_rows,int8_gemm", [(7, True), (1000, True), (7, False)])
def test_int8_index_quarters_the_vectors_and_stays_within_its_error_bound(store, chunk_rows, int8_gemm, monkeypatch):
    if not int8_gemm:  # the bfloat16 path taken where torch has no int8 matrix product
        def missing(*args):
            raise RuntimeError("no int8 GEMM here")
        monkeypatch.setattr(torch, "_int_mm", missing)
    q = torch.randn(20, 24, generator=torch.Generator().manual_seed(4))
    psi32 = {name: train_vectors(store, name) for name in ("das", "das-signed", "das-noleverage")}
    exact = {name: raw_scores(q, psi).double() for name, psi in psi32.items()}
    size32 = sum(p.stat().st_size for p in store.root.glob("index-das-*.safetensors"))
    info = build_index(store, "das", LambdaRule(rho=0.1), dtype=torch.int8)
    index = store.load_index("das")
    assert info["dtype"] == "int8" and index["psi_das"].dtype == torch.int8
    size8 = sum(p.stat().st_size for p in store.root.glob("index-das-*.safetensors"))
    assert size8 < 0.45 * size32  # psi quarters; scales, norms, leverage and residuals stay float32
    for name, t32 in exact.items():
        # rounding moves each coordinate by at most scale_i / 2: |t8 - t| <= ||q|| scale_i sqrt(k) / 2,
        # plus the float32 rounding of t32 itself
        array = "psi_das_noleverage" if name == "das-noleverage" else "psi_das"
        scale = index[f"scale.{array}"].double()
        t8 = q.double() @ (index[array].double() * scale.unsqueeze(1)).T
        bound = q.double().norm(dim=1, keepdim=True) * scale * 24 ** 0.5 / 2
        assert ((t8 - t32).abs() <= bound * (1 + 1e-12) + float32_dot_bound(q.double(), psi32[name].double())).all()
        assert ((t8 - t32).abs() > 0).any()  # it is approximate
        # streamed scoring over the int8 files equals in-memory scoring of the same int8 index
        q_norm = q.double().norm(dim=1, keepdim=True)
        if int8_gemm:  # the query rounded to int8 (topk._approximate_int8), then float32 roundings
            rounding = q.double().abs().amax(dim=1, keepdim=True) / 127 * 24 ** 0.5 / 2
            error = rounding + 2.0 ** -20 * (q_norm + rounding)
        else:  # bfloat16 products
            error = (2 * 2.0 ** -8 + 24 * U32) * q_norm
        assert_streamed_equals_in_memory(store, name, q, chunk_rows, error)


def test_attributor_streams_past_its_memory_cap_with_the_same_results(demo):
    from das_sd.attribute import Attributor

    in_memory = Attributor(demo["store"])
    streaming = Attributor(demo["store"], pipe=in_memory.pipe, max_in_memory_bytes=0)
    assert not in_memory.streams("das") and streaming.streams("das")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompt = "zorblat, a red circle on a blue background"
    features = in_memory.query_features(latents, [prompt])
    index = {row.key: i for i, row in enumerate(in_memory.rows)}
    for name in ("das", "dtrak", "tracin"):
        a = in_memory.attribute_latents(latents, prompt, name, top_k=8, features=features)[0]
        b = streaming.attribute_latents(latents, prompt, name, top_k=8, features=features)[0]
        # both equal exact float64 scoring of the same vectors, up to float32 rounding
        q, psi = features[METHODS[name].feature_set], train_vectors(in_memory.store, name)
        exact, slack = ranking(name, q.double() @ psi.double().T), score_slack(name, q, psi)
        for result in (a, b):
            assert_ranked_up_to_rounding(torch.tensor([[index[r.key] for r in result.results]]), exact, slack)
        assert all(abs(x.score - y.score) <= 2 * slack.item() for x, y in zip(a.results, b.results))
        # shares: of the exact total of all N images' positive credit, each credit within slack
        total = exact.clamp_min(0).sum().item()
        for result in (a, b):
            for r in result.results:
                expected = max(exact[0, index[r.key]].item(), 0) / total
                assert abs(r.share - expected) <= (1 + expected) * len(psi) * slack.item() / total
    assert "das" not in streaming._train  # nothing was loaded whole
