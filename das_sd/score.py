"""Scores from stored features: kernel, lambda rule, leverage, train-side vectors, and what each
method (das_sd.registry) ranks by.

docs/method.md §10-§11:
    G     = Phi^T Phi + lambda I                (float64, accumulated shard by shard)
    h_i   = phi_i^T G^-1 phi_i                  (leverage, 0 <= h_i < 1)
    psi_i = G^-1 phi_i * e_i / (1 - h_i)        (train-side vector, stored by `das-sd index`)
    t_i(x) = phi(x)^T psi_i ;  DAS_i(x) = t_i(x)^2, sign(t_i) reported
Baselines (§11) are other psi / transforms over the same code path.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .registry import method
# the rule lives in .ridge; score keeps exporting it, as callers have imported it from here
from .ridge import LAMBDA_RATIO_RANGE, LEGACY_K_RULE, RANK_RULE, LambdaRule, ridge_cholesky  # noqa: F401
from .store import FeatureStore, StoreError


def gram(store: FeatureStore, feature_set: str) -> torch.Tensor:
    """Phi^T Phi in float64, streamed over the shards (docs/method.md §10).

    Args:
        store: The feature store; its ``features.<feature_set>`` arrays are read.
        feature_set: The feature set, e.g. ``"das"``, ``"dtrak"`` or ``"trak"``.

    Returns:
        The (k, k) float64 kernel C = Phi^T Phi (no ridge term).

    Raises:
        StoreError: If the store holds no rows, or a shard is damaged or lacks the feature set.
    """
    kernel = None
    for _, arrays in store.iter_shards([f"features.{feature_set}"]):
        phi = arrays[f"features.{feature_set}"].double()
        kernel = phi.T @ phi if kernel is None else kernel.addmm_(phi.T, phi)
    if kernel is None:
        raise StoreError(f"{store.root}: the store holds no rows")
    return kernel


def index_arrays(store: FeatureStore, feature_set: str, rule: LambdaRule, dtype: torch.dtype = torch.float32,
                 kernel: torch.Tensor | None = None) -> tuple[dict, Iterator[dict[str, torch.Tensor]]]:
    """Solve the kernel once; returns the index info and a generator of its arrays, shard by shard
    (float64 only for one shard; the leverage range in the info is complete once it is exhausted).
    docs/method.md §10.

    Args:
        store: The feature store; ``features.<feature_set>`` and ``residuals.<feature_set>`` are read.
        feature_set: The feature set to index.
        rule: How lambda is chosen.
        dtype: Storage of the train-side vectors: ``torch.float32``, ``torch.float16``, or
            ``torch.int8`` (per-row scaled, with ``scale.<array>`` arrays; see ``quantize_rows``).
        kernel: Phi^T Phi when the caller has it already (a lambda sweep); None computes it (``gram``).

    Returns:
        ``(info, shards)``. ``info`` holds ``feature_set``, ``lambda``, ``lambda_rule``,
        ``kernel_trace``, ``k``, ``rows`` (N), ``dtype`` and ``leverage_range`` ([min, max] over the shards read so
        far). ``shards`` yields, per feature shard of n rows, ``kernel_solved`` (G^-1 phi_i),
        ``psi_das`` and ``psi_das_noleverage`` as (n, k) ``dtype``, their ``norm.<array>`` (n,)
        float32 row norms, and ``leverage`` and ``residual`` (n,) float32 (for the signed residual
        form, the scalar e_i with the same self-influence, see ``_train_side``).

    Raises:
        ValueError: If the features are all zero, lambda is not finite and > 0 or lies outside
            ``LAMBDA_RATIO_RANGE`` times the rule's unit (``LambdaRule.unit``), or the Cholesky factorisation fails.
        StoreError: If the store holds no rows or a shard cannot be read (while ``shards`` is
            consumed: or its residuals are neither (n,) nor shaped like its features).
        ArithmeticError: While ``shards`` is consumed, if a leverage lies outside [0, 1) (beyond
            -1e-9 of rounding).
    """
    kernel = gram(store, feature_set) if kernel is None else kernel
    rows = len(store)
    lam = rule.resolve(kernel, rows)
    k = kernel.shape[0]
    chol = ridge_cholesky(kernel, rows, lam, rule, f"{store.root}: feature set {feature_set!r}")
    info = {"feature_set": feature_set, "lambda": lam, "lambda_rule": rule.describe(),
            "kernel_trace": float(torch.trace(kernel)), "k": k, "rows": rows, "dtype": str(dtype).removeprefix("torch."),
            "leverage_range": [float("inf"), float("-inf")]}

    def shards():
        for _, arrays in store.iter_shards([f"features.{feature_set}", f"residuals.{feature_set}"]):
            phi = arrays[f"features.{feature_set}"].double()
            residual = arrays[f"residuals.{feature_set}"].double()
            solved = torch.cholesky_solve(phi.T, chol).T  # rows: G^-1 phi_i
            leverage = (phi * solved).sum(dim=1)
            if leverage.min() < -1e-9 or leverage.max() >= 1:
                raise ArithmeticError(f"leverage outside [0, 1): [{leverage.min():.3g}, {leverage.max():.3g}]")
            leverage = leverage.clamp_min(0)
            low, high = info["leverage_range"]
            info["leverage_range"] = [min(low, float(leverage.min())), max(high, float(leverage.max()))]
            psi, psi_noleverage, residual = _train_side(phi, solved, leverage, residual, chol,
                                                        f"{store.root}: feature set {feature_set!r}")
            store_as = torch.float64 if dtype == torch.int8 else dtype  # int8: quantized below
            vectors = {
                "kernel_solved": solved.to(store_as),  # trak / dtrak: G^-1 phi_i
                "psi_das": psi.to(store_as),
                "psi_das_noleverage": psi_noleverage.to(store_as),
            }
            scales = {}
            if dtype == torch.int8:
                vectors, scales = quantize_rows(vectors)
            # row norms of the stored vectors bound the error of low-precision scoring (das_sd.topk)
            norms = {f"norm.{k}": dequantize(vectors | scales, k).float().norm(dim=1) for k in vectors}
            yield vectors | scales | norms | {"leverage": leverage.float(), "residual": residual.float()}
    return info, shards()


def _train_side(phi: torch.Tensor, solved: torch.Tensor, leverage: torch.Tensor, residual: torch.Tensor,
                chol: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(psi_i, psi_i without the leverage step, the scalar residual recorded) of one shard, float64
    (docs/method.md §10). A scalar residual e_i gives G^-1 phi_i e_i / (1 - h_i); the signed form's
    vector u_i the exact rank-one leave-one-out step (G - phi_i phi_i^T)^-1 u_i
    = G^-1 u_i + G^-1 phi_i (phi_i^T G^-1 u_i) / (1 - h_i) (Sherman-Morrison; the scalar case is
    u_i = e_i phi_i), and records e_i = phi_i^T G^-1 u_i / h_i, the scalar with the same
    self-influence phi_i^T psi_i = h_i e_i / (1 - h_i)."""
    if residual.ndim == 1:
        return (solved * (residual / (1 - leverage)).unsqueeze(1), solved * residual.unsqueeze(1), residual)
    if residual.shape != phi.shape:
        raise StoreError(f"{where}: residuals of shape {tuple(residual.shape)} match neither the rows (scalar "
                         f"forms) nor the features' shape {tuple(phi.shape)} (the signed form)")
    moved = torch.cholesky_solve(residual.T, chol).T  # rows: G^-1 u_i
    along = (phi * moved).sum(dim=1)  # phi_i^T G^-1 u_i
    psi = moved + solved * (along / (1 - leverage)).unsqueeze(1)
    effective = torch.where(leverage > 0, along / leverage.clamp_min(torch.finfo(leverage.dtype).tiny), 0.0)
    return psi, moved, effective


def quantize_rows(vectors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Symmetric int8 per row: v_i ~ scale_i * q_i with scale_i = max |v_i| / 127, so every row keeps
    its own range (the rows of psi differ in norm by orders of magnitude through e_i / (1 - h_i)).

    Args:
        vectors: ``{name: (n, k) float tensor}`` of train-side vectors.

    Returns:
        ``(quantized, scales)``: ``{name: (n, k) int8}`` with values in [-127, 127], and
        ``{"scale.<name>": (n,) float32}`` (1 for an all-zero row).
    """
    quantized, scales = {}, {}
    for name, v in vectors.items():
        scale = v.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized[name] = torch.round(v / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        scales[f"scale.{name}"] = scale.float()
    return quantized, scales


def dequantize(index: dict[str, torch.Tensor], array: str) -> torch.Tensor:
    """A train-side array ready for ``raw_scores``: int8 rows times their scale (float32); float
    arrays as stored (widened per product, so a float16 index stays half the memory).

    Args:
        index: The arrays of an index (``FeatureStore.load_index``); int8 arrays need their
            ``scale.<array>`` beside them.
        array: Which one, e.g. ``"psi_das"`` or ``"kernel_solved"``.

    Returns:
        The (N, k) array: float32 for int8 storage, else in its stored dtype.
    """
    values = index[array]
    if values.dtype == torch.int8:
        return values.float() * index[f"scale.{array}"].unsqueeze(1)
    return values


def build_index(store: FeatureStore, feature_set: str, rule: LambdaRule, dtype: torch.dtype = torch.float32) -> dict:
    """Solve the kernel once and store psi for every method on ``feature_set``, one index file per
    feature shard.

    Args:
        store: The feature store to index (written in place).
        feature_set: The feature set to index.
        rule: How lambda is chosen.
        dtype: Storage of the train-side vectors (float16 halves what scoring reads and stays exact
            through das_sd.topk's rescoring; int8 quarters it, per-row scaled and approximate).

    Returns:
        The index info (as ``index_arrays``, plus its ``generation``).

    Raises:
        ValueError: If lambda is unusable (see ``index_arrays``).
    """
    return build_indexes(store, [feature_set], rule, dtype)[feature_set]


def build_indexes(store: FeatureStore, feature_sets: list[str], rule: LambdaRule,
                  dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """``build_index`` for several feature sets as one generation: every set's files are written
    first, then one manifest write switches all of them, so a kill never leaves the sets indexed
    with different lambdas. Index files left by an earlier killed run are deleted first.

    Args:
        store: The feature store to index (written in place).
        feature_sets: The feature sets to index, all with the same rule.
        rule: How lambda is chosen (resolved per feature set, against its own kernel).
        dtype: Storage of the train-side vectors (see ``build_index``).

    Returns:
        ``{feature_set: index info}``, each info as ``index_arrays`` plus the shared ``generation``.

    Raises:
        ValueError: If lambda is unusable for a set (see ``index_arrays``); no set is switched then.
    """
    store.remove_orphan_indexes()
    generation = store.new_generation()
    built = {}
    for name in feature_sets:
        info, shards = index_arrays(store, name, rule, dtype)
        files = store.write_index_files(name, shards, generation)  # exhausts shards: info is complete
        built[name] = (files, info | {"generation": generation})
    store.record_indexes(built)
    return {name: info for name, (_, info) in built.items()}


def refresh_indexes(store: FeatureStore, rule: LambdaRule | None = None) -> dict[str, dict]:
    """Index, as one generation, every feature set of ``store`` whose index is missing or out of date.

    Args:
        store: The feature store (written in place).
        rule: How lambda is chosen; None: the default rule (rho = ``DEFAULT_RHO`` times the mean
            non-zero eigenvalue), not the one an earlier index recorded.

    Returns:
        ``{feature_set: index info}`` of the sets indexed now; empty when every index is current.
    """
    stale = [name for name in store.identity["feature_sets"] if not store.index_is_current(name)]
    return build_indexes(store, stale, rule or LambdaRule()) if stale else {}


def index_in_memory(store: FeatureStore, feature_set: str, rule: LambdaRule,
                    kernel: torch.Tensor | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The index arrays for another lambda without writing them (e.g. to sweep lambda).

    Args:
        store: The feature store (only read).
        feature_set: The feature set.
        rule: How lambda is chosen.
        kernel: Phi^T Phi when the caller has it already; None computes it (``gram``).

    Returns:
        ``(info, arrays)``: the info as ``index_arrays`` gives it, and every index array (float32)
        concatenated over all N rows.
    """
    info, shards = index_arrays(store, feature_set, rule, kernel=kernel)
    parts: dict[str, list[torch.Tensor]] = {}
    for arrays in shards:
        for name, value in arrays.items():
            parts.setdefault(name, []).append(value)
    return info, {name: torch.cat(values) for name, values in parts.items()}


def train_array(name: str) -> tuple[str, str]:
    """Where a gradient method's train-side vectors live: ("features" | "index", array name).

    Args:
        name: A method of ``registry.METHODS`` other than ``latent-sim``.

    Returns:
        ``("features", "features.<set>")`` for a method without kernel (tracin), else ``("index",
        a)`` with ``a`` one of ``kernel_solved``, ``psi_das``, ``psi_das_noleverage``.

    Raises:
        ValueError: If ``name`` is unknown or has no gradient vectors (latent-sim).
    """
    m = method(name)
    if m.feature_set is None:
        raise ValueError(f"{name} has no train-side gradient vectors")
    if not m.kernel:
        return "features", f"features.{m.feature_set}"
    return "index", "kernel_solved" if not m.residual else ("psi_das" if m.leverage else "psi_das_noleverage")


def train_vectors(store: FeatureStore, name: str, device: str = "cpu") -> torch.Tensor:
    """The (N, k) train-side matrix of a gradient method: scores are query_features @ it.T.

    Args:
        store: The feature store (indexed, for the kernel methods).
        name: A gradient method (not ``latent-sim``).
        device: Where to load the matrix.

    Returns:
        The (N, k) matrix: float32 features, or the index array dequantized (float32 for int8,
        else as stored).

    Raises:
        ValueError: If ``name`` is unknown or has no gradient vectors.
        StoreError: If the index is missing or out of date, or a file is damaged.
    """
    where, array = train_array(name)
    if where == "features":
        return store.load(array, device)
    return dequantize(store.load_index(method(name).feature_set, device), array)


def raw_scores(query_features: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """t (q, N) = phi_q^T psi_i in float32 accumulate (float64 for small problems is not needed).

    Args:
        query_features: (q, k) query features phi_q.
        train: (N, k) train-side vectors of the method (``train_vectors``).

    Returns:
        The (q, N) float32 signed effects t.
    """
    return query_features.float() @ train.float().T


def latent_similarity(query_latents: torch.Tensor, train_latents: torch.Tensor) -> torch.Tensor:
    """The latent-sim baseline's t: cosine similarity of flattened latents x_0 (docs/method.md §11).

    Args:
        query_latents: (q, ...) query latents, e.g. (q, 4, h, w).
        train_latents: (N, ...) training latents with as many elements per row.

    Returns:
        The (q, N) float32 cosines, in [-1, 1].
    """
    q = torch.nn.functional.normalize(query_latents.flatten(1).float(), dim=1)
    t = torch.nn.functional.normalize(train_latents.flatten(1).float(), dim=1)
    return q @ t.T


def ranking(name: str, t: torch.Tensor) -> torch.Tensor:
    """What method ``name`` ranks by, from its signed effects t: t^2 for the squared methods (das,
    das-noleverage; the sign of t is reported beside), t itself for the others.

    Args:
        name: A method of ``registry.METHODS``.
        t: Signed effects, any shape.

    Returns:
        The ranking scores (larger ranks first), shaped like ``t``.
    """
    return t.pow(2) if method(name).squared else t


def ranking_key(name: str, t: torch.Tensor) -> torch.Tensor:
    """A key that orders like ``ranking`` and moves by at most |dt| when t moves by dt (|t| for the
    squared methods, t otherwise): a bound on the error of t bounds the error of the key.

    Args:
        name: A method of ``registry.METHODS``.
        t: Signed effects, any shape.

    Returns:
        The key, shaped like ``t``.
    """
    return t.abs() if method(name).squared else t


def key_of_ranking(name: str, score: torch.Tensor) -> torch.Tensor:
    """``ranking_key`` of the effects whose ``ranking`` is ``score`` (sqrt of t^2 for the squared methods).

    Args:
        name: A method of ``registry.METHODS``.
        score: Ranking scores (``ranking``), any shape; negatives are clamped to 0 for squared methods.

    Returns:
        The key, shaped like ``score``.
    """
    return score.clamp_min(0).sqrt() if method(name).squared else score
