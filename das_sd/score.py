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

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .registry import DEFAULT_RHO, method
from .store import FeatureStore, StoreError


# the recorded names of the two rho rules (an index's info, "lambda_rule" -> "rule")
RANK_RULE = "rho * trace(Phi^T Phi) / min(N, k)"
LEGACY_K_RULE = "rho * trace(Phi^T Phi) / k"  # indexes written before the rank rule


@dataclass(frozen=True)
class LambdaRule:
    """How ``das-sd index`` picks the ridge term: lambda = rho * trace(Phi^T Phi) / min(N, k), or an
    explicit value (docs/method.md §10).

    Phi^T Phi has at most min(N, k) non-zero eigenvalues, and their sum trace(Phi^T Phi) =
    sum_i ||phi_i||^2 does not depend on k (the projection keeps norms in expectation), so with N < k
    trace / min(N, k), their mean, is the same at every k: a rho gives the same ridge whatever the
    projection's dimension. The rule of indexes
    written before it, trace / k, shrank lambda as k grew past N; it is still read (``per_k``).

    Attributes:
        rho: Scale-free ridge, in units of the mean non-zero eigenvalue of Phi^T Phi (``--rho``,
            default ``registry.DEFAULT_RHO``). Unused when ``value`` is set.
        value: An explicit lambda (``--lambda``); None: lambda follows ``rho``.
        per_k: Divide the trace by k rather than min(N, k): the rule of older indexes, kept so that
            their recorded rule reads back (and reindexes) as it was.
    """
    rho: float = DEFAULT_RHO
    value: float | None = None
    per_k: bool = False

    def unit(self, kernel: torch.Tensor, rows: int) -> float:
        """The kernel's scale that ``rho`` multiplies: trace / min(N, k) (trace / k for ``per_k``).

        Args:
            kernel: Phi^T Phi, (k, k) float64, without the ridge term.
            rows: N, the number of feature rows it sums.

        Returns:
            The mean non-zero eigenvalue (the mean eigenvalue for ``per_k``).

        Raises:
            ValueError: If ``rows`` is below 1.
        """
        if rows < 1:
            raise ValueError(f"lambda rule: the kernel sums {rows} rows; at least 1 is needed")
        k = kernel.shape[0]
        return float(torch.trace(kernel).item() / (k if self.per_k else min(rows, k)))

    def resolve(self, kernel: torch.Tensor, rows: int) -> float:
        """The lambda this rule gives for ``kernel`` (not range-checked here; indexing refuses a bad one).

        Args:
            kernel: Phi^T Phi, (k, k) float64, without the ridge term.
            rows: N, the number of feature rows it sums.

        Returns:
            ``value`` when set, else rho * ``unit(kernel, rows)``.

        Raises:
            ValueError: If ``rows`` is below 1.
        """
        if self.value is not None:
            return float(self.value)
        return float(self.rho * self.unit(kernel, rows))

    def describe(self) -> dict:
        """The rule as recorded in an index's info (``lambda_rule``); ``from_description`` reads it back.

        Returns:
            ``{"rule": "explicit", "value": lambda}`` or ``{"rule": RANK_RULE (LEGACY_K_RULE for
            ``per_k``), "rho": rho}``.
        """
        if self.value is not None:
            return {"rule": "explicit", "value": self.value}
        return {"rule": LEGACY_K_RULE if self.per_k else RANK_RULE, "rho": self.rho}

    @classmethod
    def from_description(cls, description: dict) -> "LambdaRule":
        """The rule an index recorded (``describe``), to index another store the same way.

        Args:
            description: A dict written by ``describe``, by this or an older version (whose rho rule
                is ``LEGACY_K_RULE``); a missing ``rho`` means the default one, a missing rule the
                current default rule.

        Returns:
            The recorded rule.

        Raises:
            ValueError: If the dict names a rule this version does not know.
        """
        rule = description.get("rule", RANK_RULE)
        if rule not in (RANK_RULE, LEGACY_K_RULE, "explicit"):
            raise ValueError(f"lambda_rule {rule!r}: expected one of {RANK_RULE!r}, {LEGACY_K_RULE!r}, 'explicit'")
        return cls(rho=description.get("rho", cls.rho), value=description.get("value"), per_k=rule == LEGACY_K_RULE)

    def unit_name(self) -> str:
        """How ``unit`` is written in messages.

        Returns:
            ``"trace(Phi^T Phi) / k"`` for ``per_k``, else ``"trace(Phi^T Phi) / min(N, k)"``.
        """
        return "trace(Phi^T Phi) / k" if self.per_k else "trace(Phi^T Phi) / min(N, k)"


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


# lambda / unit outside this range is meaningless (unit: the kernel's mean non-zero eigenvalue): below,
# G is Phi^T Phi, singular in float64 (Cholesky fails or psi is noise); above, G^-1 phi is ~ phi / lambda
# and every score underflows to 0
LAMBDA_RATIO_RANGE = (1e-10, 1e10)


def _cholesky(kernel: torch.Tensor, rows: int, lam: float, rule: LambdaRule, store: FeatureStore,
              feature_set: str) -> torch.Tensor:
    """Cholesky factor of Phi^T Phi + lambda I, or ValueError naming --lambda / --rho, with the
    rule's unit (the kernel's mean non-zero eigenvalue) for scale and a value that works."""
    k = kernel.shape[0]
    scale = rule.unit(kernel, rows)
    unit = rule.unit_name()
    flag = f"--lambda {rule.value:g}" if rule.value is not None else f"--rho {rule.rho:g}"
    where = f"{store.root}: feature set {feature_set!r}"
    if not scale > 0:
        raise ValueError(f"{where}: the features are all zero (trace(Phi^T Phi) = {float(torch.trace(kernel)):g}); "
                         "nothing to index")
    default_lam = LambdaRule().resolve(kernel, rows)
    suggest = f"e.g. --rho {LambdaRule.rho:g} (lambda = {default_lam:.3g}, the default)"
    if not math.isfinite(lam) or not lam > 0:
        raise ValueError(f"{where}: {flag} gives lambda = {lam:g}; lambda must be finite and > 0, {suggest}")
    low, high = LAMBDA_RATIO_RANGE
    ratio = lam / scale
    if not low <= ratio <= high:
        raise ValueError(f"{where}: {flag} gives lambda = {lam:.3g}, {ratio:.3g} times the kernel's mean "
                         f"non-zero eigenvalue {unit} = {scale:.3g}; outside [{low:g}, {high:g}] times it "
                         f"the scores mean nothing ({'too small: the kernel is singular' if ratio < low else 'too large: every score underflows to 0'}); {suggest}")
    try:
        return torch.linalg.cholesky(kernel + lam * torch.eye(k, dtype=torch.float64))
    except torch.linalg.LinAlgError:
        raise ValueError(f"{where}: Phi^T Phi + lambda I is not positive definite in float64 with {flag} "
                         f"(lambda = {lam:.3g}, {ratio:.3g} times {unit} = {scale:.3g}); "
                         f"use a larger one, {suggest}") from None


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
        StoreError: If the store holds no rows or a shard cannot be read.
        ArithmeticError: While ``shards`` is consumed, if a leverage lies outside [0, 1) (beyond
            -1e-9 of rounding).
    """
    kernel = gram(store, feature_set) if kernel is None else kernel
    rows = len(store)
    lam = rule.resolve(kernel, rows)
    k = kernel.shape[0]
    chol = _cholesky(kernel, rows, lam, rule, store, feature_set)
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
            psi, psi_noleverage, residual = _train_side(phi, solved, leverage, residual, chol)
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
                chol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(psi_i, psi_i without the leverage step, the scalar residual recorded) of one shard, float64
    (docs/method.md §10). A scalar residual e_i gives G^-1 phi_i e_i / (1 - h_i); the signed form's
    vector u_i the exact rank-one leave-one-out step (G - phi_i phi_i^T)^-1 u_i
    = G^-1 u_i + G^-1 phi_i (phi_i^T G^-1 u_i) / (1 - h_i) (Sherman-Morrison; the scalar case is
    u_i = e_i phi_i), and records e_i = phi_i^T G^-1 u_i / h_i, the scalar with the same
    self-influence phi_i^T psi_i = h_i e_i / (1 - h_i)."""
    if residual.ndim == 1:
        return (solved * (residual / (1 - leverage)).unsqueeze(1), solved * residual.unsqueeze(1), residual)
    if residual.shape != phi.shape:
        raise StoreError(f"signed residuals of shape {tuple(residual.shape)} do not match the features' {tuple(phi.shape)}")
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
