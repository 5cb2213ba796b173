"""Scores equal a direct float64 numpy implementation of METHOD.md section 6 on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from das_sd.score import LambdaRule, build_index, latent_similarity, rank_scores, raw_scores, train_vectors
from das_sd.store import FeatureStore, Row
from tolerances import FLOAT32_STORE_RTOL, float32_dot_bound

pytestmark = pytest.mark.numerics


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 40, 16
    phi = rng.normal(size=(n, k)).astype(np.float32)
    residual = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    latents = rng.normal(size=(n, 4, 2, 2)).astype(np.float32)
    s = FeatureStore.create(tmp_path / "store", {"test": 1}, shard_size=16)
    for start in range(0, n, 16):
        sl = slice(start, start + 16)
        rows = [Row(f"k{i}", f"img{i}.png", f"caption {i}") for i in range(start, min(n, start + 16))]
        s.append_shard(rows, {"features.das": torch.from_numpy(phi[sl]), "residuals.das": torch.from_numpy(residual[sl]),
                              "latents": torch.from_numpy(latents[sl])})
    return s, phi.astype(np.float64), residual.astype(np.float64), latents


def test_das_and_baselines_match_numpy(store):
    s, phi, e, _ = store
    rho = 0.3
    info = build_index(s, "das", LambdaRule(rho=rho))
    kernel = phi.T @ phi
    lam = rho * np.trace(kernel) / kernel.shape[0]
    assert info["lambda"] == pytest.approx(lam, rel=1e-9)
    g_inv = np.linalg.inv(kernel + lam * np.eye(kernel.shape[0]))
    h = np.einsum("ik,kl,il->i", phi, g_inv, phi)
    assert np.all((0 <= h) & (h < 1))
    psi = (g_inv @ phi.T).T * (e / (1 - h))[:, None]
    q = np.random.default_rng(1).normal(size=(3, phi.shape[1]))
    t = q @ psi.T
    stored_psi = train_vectors(s, "das").double().numpy()
    assert np.allclose(stored_psi, psi, rtol=FLOAT32_STORE_RTOL, atol=0)
    got_t = raw_scores(torch.from_numpy(q).float(), train_vectors(s, "das")).double().numpy()
    bound = float32_dot_bound(q, psi)
    assert np.all(np.abs(got_t - t) <= bound)
    score, sign = rank_scores("das", torch.from_numpy(got_t))
    assert np.all(np.abs(score.numpy() - t ** 2) <= bound * (2 * np.abs(t) + bound) * (1 + 1e-12))
    decided = np.abs(t) > bound  # below the bound float32 does not determine the sign
    assert decided.mean() > 0.9 and np.array_equal(sign.numpy()[decided], np.sign(t)[decided])
    no_lev = (g_inv @ phi.T).T * e[:, None]
    assert np.allclose(train_vectors(s, "das-noleverage").double().numpy(), no_lev, rtol=FLOAT32_STORE_RTOL, atol=0)
    assert np.array_equal(train_vectors(s, "tracin").double().numpy(), phi)  # the stored features themselves
    assert np.allclose(s.load_index("das")["leverage"].double().numpy(), h, rtol=FLOAT32_STORE_RTOL, atol=0)


def test_explicit_lambda_and_out_of_date_index(store):
    s, phi, _, _ = store
    info = build_index(s, "das", LambdaRule(value=2.5))
    assert info["lambda"] == 2.5 and info["lambda_rule"]["rule"] == "explicit"
    s.append_shard([Row("new", "new.png", "new")], {"features.das": torch.ones(1, 16), "residuals.das": torch.ones(1),
                                                    "latents": torch.ones(1, 4, 2, 2)})
    with pytest.raises(ValueError, match="out of date"):
        train_vectors(s, "das")


def test_latent_similarity_is_cosine(store):
    s, _, _, latents = store
    q = torch.randn(2, 4, 2, 2)
    sim = latent_similarity(q, s.load("latents")).numpy()
    a = q.flatten(1).numpy()
    b = latents.reshape(len(latents), -1)
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    # cosines of unit vectors of 16 entries: float32 errs by at most ~(16 + 4) u32 = 1.2e-6 per entry
    assert np.allclose(sim, expected, rtol=0, atol=1e-5)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        rank_scores("magic", torch.zeros(1))
