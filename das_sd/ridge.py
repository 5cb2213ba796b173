"""The ridge term of the kernel: how lambda is chosen and the Cholesky factor of Phi^T Phi + lambda I
(docs/method.md §10).

    lambda = rho * trace(Phi^T Phi) / min(N, k)       the mean non-zero eigenvalue times rho
    lambda = rho * trace(Phi^T Phi) / k               indexes written before it (read back as such)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .registry import DEFAULT_RHO

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


# lambda / unit outside this range is meaningless (unit: the kernel's mean non-zero eigenvalue): below,
# G is Phi^T Phi, singular in float64 (Cholesky fails or psi is noise); above, G^-1 phi is ~ phi / lambda
# and every score underflows to 0
LAMBDA_RATIO_RANGE = (1e-10, 1e10)


def ridge_cholesky(kernel: torch.Tensor, rows: int, lam: float, rule: LambdaRule, where: str) -> torch.Tensor:
    """Cholesky factor of Phi^T Phi + lambda I, refusing a lambda that means nothing.

    Args:
        kernel: Phi^T Phi, (k, k) float64, without the ridge term.
        rows: N, the number of feature rows it sums.
        lam: The lambda ``rule`` gave.
        rule: The rule, named in errors (``--rho`` / ``--lambda``) with its unit for scale.
        where: What is indexed, to start error messages (the store and feature set).

    Returns:
        The lower Cholesky factor of ``kernel + lam I``, float64.

    Raises:
        ValueError: If the features are all zero, lambda is not finite and > 0 or lies outside
            ``LAMBDA_RATIO_RANGE`` times the rule's unit, or the factorisation fails; each names the
            flag, the unit and a value that works.
    """
    k = kernel.shape[0]
    scale = rule.unit(kernel, rows)
    unit = rule.unit_name()
    flag = f"--lambda {rule.value:g}" if rule.value is not None else f"--rho {rule.rho:g}"
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
