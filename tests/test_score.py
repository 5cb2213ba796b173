"""Scores equal a direct float64 numpy implementation of docs/method.md §10-§11 on the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from das_sd.cli import main
from das_sd.registry import DEFAULT_RHO
from das_sd.score import (LEGACY_K_RULE, RANK_RULE, LambdaRule, build_index, index_arrays, key_of_ranking,
                          latent_similarity, ranking, ranking_key, raw_scores, train_vectors)
from das_sd.store import FeatureStore, Row, StoreError
from tolerances import FLOAT32_STORE_RTOL, float32_dot_bound

pytestmark = pytest.mark.numerics


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 40, 16
    phi = rng.normal(size=(n, k)).astype(np.float32)
    residual = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    latents = rng.normal(size=(n, 4, 2, 2)).astype(np.float32)
    s = FeatureStore.create(tmp_path / "store", {"test": 1, "feature_sets": {"das": {}}}, shard_size=16)
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
    score, sign = ranking("das", torch.from_numpy(got_t)), torch.sign(torch.from_numpy(got_t))
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
        ranking("magic", torch.zeros(1))


@pytest.mark.parametrize("name, squared", [("das", True), ("das-noleverage", True), ("das-signed", False),
                                           ("dtrak", False), ("trak", False), ("tracin", False), ("latent-sim", False)])
def test_ranking_squares_t_for_das_and_keeps_it_signed_otherwise(name, squared):
    """DAS ranks by t^2 (METHOD.md section 6), the baselines and das-signed by t; the streaming key
    (|t| for t^2) orders alike and is recovered from a ranking score."""
    t = torch.tensor([[-3.0, -0.5, 0.0, 2.0]], dtype=torch.float64)
    expected = torch.tensor([[9.0, 0.25, 0.0, 4.0]], dtype=torch.float64) if squared else t
    assert torch.equal(ranking(name, t), expected)
    key = ranking_key(name, t)
    assert torch.equal(key, t.abs() if squared else t)
    assert torch.equal(torch.argsort(key, descending=True), torch.argsort(ranking(name, t), descending=True))
    assert torch.equal(key_of_ranking(name, ranking(name, t)), key)


@pytest.mark.parametrize("rule, flag, says", [
    (LambdaRule(value=1e-300), "--lambda 1e-300", "too small: the kernel is singular"),
    (LambdaRule(value=1e308), "--lambda 1e+308", "too large: every score underflows to 0"),
    (LambdaRule(rho=1e-12), "--rho 1e-12", "too small"),
    (LambdaRule(rho=float("inf")), "--rho inf", "lambda must be finite and > 0"),
    (LambdaRule(value=float("nan")), "--lambda nan", "lambda must be finite and > 0"),
    (LambdaRule(value=-1.0), "--lambda -1", "lambda must be finite and > 0"),
])
def test_meaningless_lambda_is_refused_naming_the_flag_and_the_kernel_scale(store, rule, flag, says):
    s, phi, _, _ = store
    scale = np.trace(phi.T @ phi) / phi.shape[1]
    with pytest.raises(ValueError) as err:
        index_arrays(s, "das", rule)
    message = str(err.value)
    assert message.startswith(f"{s.root}: feature set 'das': {flag} gives lambda = ") and says in message
    assert "features may all be zero" not in message and f"--rho {DEFAULT_RHO:g}" in message
    if "finite" not in says:  # N = 40 > k = 16: the mean non-zero eigenvalue is trace / k
        assert f"trace(Phi^T Phi) / min(N, k) = {scale:.3g}" in message


def test_lambda_at_the_ends_of_the_range_still_indexes(store):
    s, phi, _, _ = store
    scale = np.trace(phi.T @ phi) / phi.shape[1]
    for ratio in (1e-9, 1e9):
        info, _ = index_arrays(s, "das", LambdaRule(value=ratio * scale))
        assert info["lambda"] == ratio * scale


def test_a_failed_cholesky_names_the_flag_without_a_traceback(store, monkeypatch):
    s, _, _, _ = store

    def not_positive_definite(*_args, **_kwargs):
        raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")
    monkeypatch.setattr(torch.linalg, "cholesky", not_positive_definite)
    with pytest.raises(ValueError, match=rf"not positive definite in float64 with --rho {DEFAULT_RHO:g} .*use a larger one"):
        index_arrays(s, "das", LambdaRule())


def test_all_zero_features_say_so(tmp_path):
    s = FeatureStore.create(tmp_path / "zero", {"test": 1}, shard_size=4)
    s.append_shard([Row("a", "a.png", "a")], {"features.das": torch.zeros(1, 4), "residuals.das": torch.ones(1)})
    with pytest.raises(ValueError, match="the features are all zero"):
        index_arrays(s, "das", LambdaRule())


@pytest.mark.parametrize("argv, code, says", [
    (["--lambda", "inf"], 2, "argument --lambda: 'inf' is not a finite positive number"),
    (["--lambda", "nan"], 2, "argument --lambda: 'nan' is not a finite positive number"),
    (["--lambda", "0"], 2, "argument --lambda: '0' is not a finite positive number"),
    (["--rho", "inf"], 2, "argument --rho: 'inf' is not a finite positive number"),
    (["--rho", "-3"], 2, "argument --rho: '-3' is not a finite positive number"),
    (["--lambda", "1e-300"], 2, "--lambda 1e-300 gives lambda = 1e-300"),
    (["--lambda", "1e308"], 2, "--lambda 1e+308 gives lambda = 1e+308"),
])
def test_index_command_refuses_a_meaningless_lambda(store, capsys, argv, code, says):
    s = store[0]
    before = (s.root / "manifest.json").read_bytes()
    try:
        got = main(["index", "--store", str(s.root), *argv])
    except SystemExit as exc:  # argparse
        got = exc.code
    out, err = capsys.readouterr()
    assert got == code and says in err and "Traceback" not in err and "may all be zero" not in err
    assert (s.root / "manifest.json").read_bytes() == before  # no index was recorded


def test_index_command_uses_the_default_rule(store, capsys):
    s, phi, _, _ = store
    assert main(["index", "--store", str(s.root)]) == 0
    kernel = phi.T @ phi
    info = s.__class__.open(s.root).manifest["indexes"]["das"]
    assert info["lambda_rule"] == {"rule": RANK_RULE, "rho": DEFAULT_RHO} and info["rows"] == 40
    assert info["lambda"] == pytest.approx(DEFAULT_RHO * np.trace(kernel) / min(40, kernel.shape[0]), rel=1e-9)


def _store_of(root, phi: np.ndarray, residual: np.ndarray) -> FeatureStore:
    s = FeatureStore.create(root, {"test": 1, "feature_sets": {"das": {}}}, shard_size=4)
    for start in range(0, len(phi), 4):
        sl = slice(start, start + 4)
        rows = [Row(f"k{i}", f"img{i}.png", f"c{i}") for i in range(start, min(len(phi), start + 4))]
        s.append_shard(rows, {"features.das": torch.from_numpy(phi[sl]).float(),
                              "residuals.das": torch.from_numpy(residual[sl]).float()})
    return s


def test_lambda_is_rho_times_the_mean_nonzero_eigenvalue_at_every_k(tmp_path):
    """N = 10 rows: trace / min(N, k) is trace / 10 at k = 64 and k = 256 alike (the rule of old
    indexes, trace / k, gave 4 x less lambda at the larger k); old descriptions read back as they were."""
    rng = np.random.default_rng(3)
    gradients = rng.normal(size=(10, 4000))
    for k in (64, 256):
        phi = gradients @ rng.normal(size=(4000, k)) / np.sqrt(k)  # a Gaussian JL projection
        s = _store_of(tmp_path / f"k{k}", phi, np.ones(10))
        phi = phi.astype(np.float32).astype(np.float64)
        trace = np.trace(phi.T @ phi)
        eigenvalues = np.linalg.eigvalsh(phi.T @ phi)
        nonzero = eigenvalues[eigenvalues > 1e-6 * eigenvalues.max()]
        assert len(nonzero) == 10 and trace / 10 == pytest.approx(nonzero.mean(), rel=1e-9)
        info = build_index(s, "das", LambdaRule(rho=2.0))
        assert info["lambda"] == pytest.approx(2.0 * trace / 10, rel=1e-9)
        old = LambdaRule.from_description({"rule": LEGACY_K_RULE, "rho": 2.0})
        assert old.per_k and old.describe() == {"rule": LEGACY_K_RULE, "rho": 2.0}
        assert build_index(s, "das", old)["lambda"] == pytest.approx(2.0 * trace / k, rel=1e-9)
    assert LambdaRule.from_description({"rule": "explicit", "value": 0.5}) == LambdaRule(value=0.5)
    assert LambdaRule.from_description(LambdaRule(rho=3.0).describe()) == LambdaRule(rho=3.0)
    with pytest.raises(ValueError, match="lambda_rule 'rho \\* trace / N'"):
        LambdaRule.from_description({"rule": "rho * trace / N", "rho": 1.0})


def test_residuals_of_another_shape_are_refused_naming_the_store(tmp_path):
    phi = np.random.default_rng(5).normal(size=(4, 8))
    s = _store_of(tmp_path / "bad", phi, np.ones((4, 9)))
    with pytest.raises(StoreError, match=r"bad: feature set 'das': residuals of shape \(4, 9\) match neither"):
        build_index(s, "das", LambdaRule())


def test_signed_residual_vectors_take_the_exact_leave_one_out_step(tmp_path):
    """A vector residual u_i (docs/method.md §9) is indexed as (G - phi_i phi_i^T)^-1 u_i, checked
    against a direct float64 inverse of the downdated kernel (no Sherman-Morrison); without the
    leverage step G^-1 u_i; the recorded scalar keeps the self-influence phi_i^T psi_i = h_i e_i / (1 - h_i).
    Inputs are float32 values, so the stored float32 vectors differ from float64 only by their own
    rounding (FLOAT32_STORE_RTOL); the two stores of the last check are two such roundings."""
    rng = np.random.default_rng(4)
    n, k = 12, 8
    phi = rng.normal(size=(n, k)).astype(np.float32).astype(np.float64)
    u = (rng.normal(size=(n, k)) + 0.5 * phi).astype(np.float32).astype(np.float64)
    s = _store_of(tmp_path / "signed", phi, u)
    info = build_index(s, "das", LambdaRule(rho=0.5))
    g = phi.T @ phi + info["lambda"] * np.eye(k)
    assert info["lambda"] == pytest.approx(0.5 * np.trace(phi.T @ phi) / k, rel=1e-9)
    expected = np.stack([np.linalg.solve(g - np.outer(phi[i], phi[i]), u[i]) for i in range(n)])
    index = s.load_index("das")
    assert np.allclose(index["psi_das"].double().numpy(), expected, rtol=FLOAT32_STORE_RTOL, atol=0)
    assert np.allclose(index["psi_das_noleverage"].double().numpy(), np.linalg.solve(g, u.T).T,
                       rtol=FLOAT32_STORE_RTOL, atol=0)
    h = np.einsum("ik,kl,il->i", phi, np.linalg.inv(g), phi)
    self_influence = np.einsum("ik,ik->i", phi, expected)
    e = index["residual"].double().numpy()
    assert np.allclose(h * e / (1 - h), self_influence, rtol=FLOAT32_STORE_RTOL, atol=0)
    # the scalar form is the special case u_i = e_i phi_i
    scalar = _store_of(tmp_path / "scalar", phi, np.full(n, 2.0))  # 2 phi_i: exact in float32
    vector = _store_of(tmp_path / "vector", phi, 2.0 * phi)
    build_index(scalar, "das", LambdaRule(rho=0.5))
    build_index(vector, "das", LambdaRule(rho=0.5))
    for name in ("psi_das", "psi_das_noleverage", "residual"):
        a, b = scalar.load_index("das")[name].double(), vector.load_index("das")[name].double()
        assert torch.allclose(a, b, rtol=2 * FLOAT32_STORE_RTOL, atol=0), name
