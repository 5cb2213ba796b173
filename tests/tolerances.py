"""Tolerances of the numerical tests, and the error analysis they come from.

Unit roundoff: u32 = 2^-24 = 6.0e-8 (float32), u64 = 2^-53 = 1.1e-16 (float64).

Two evaluations of the same quantity that differ only in how the work is batched (one row vs a
batch, a LoRA merged by hand vs applied by peft, 1 vs 2 threads) run other BLAS blockings and
reduction orders, so they differ by rounding: relative difference <= A * u, with A the error
amplification of the computation. Measured on the tiny UNet (tests run on it), batch of 6 vs one row
at a time, with OMP_NUM_THREADS=1 and 2:
- one forward pass (noise predictions, sigma = 0.87): |difference| median 9 u sigma, max 174 u sigma;
- projected LoRA gradients (forward + backward): relative differences 2.8e-6 .. 5.6e-5 in float32
  (A <= 940); 1.47e-4 (A ~ 2,500) on another machine of the same kind, where a clean clone failed a
  1e-4 bound: A depends on the CPU's kernels, so a float32 bound near 1e-4 is a gamble; in float64 at
  most 7.8e-14 (A <= 700) over every algebraic test below.

Kinks: f = l1 differentiates |eps_theta|. An element of the prediction within delta (the forward's
rounding difference, 10 .. 170 u sigma) of 0 can take opposite signs in the two evaluations, which
changes that row's gradient by 2 J_j / N (N = 256 elements): O(1 / sqrt(N)) relative, far above any
rounding bound. The chance per element is about 0.8 delta / sigma: up to 1e-5 in float32, so up to
2 % per test of 3 samples x 3 timesteps x 256 elements; in float64 about 2e-14 per element, 5e-11 per
test. Hence:

- ALGEBRAIC claims (batched = one-by-one autograd, projected = P^T brute force, shared forward =
  separate forward) are checked in float64 with ALGEBRAIC_RTOL = 1e-10: 9 x above A = 1e5 (100 x the
  gradient amplification measured) times u64, and 1,300 x the largest difference seen.
  A gradient whose row is ill-conditioned takes more: the loss gradient of the SD 2.x-layout v model
  at t = 0 (x_t ~ x_0, a small gradient made of large cancelling terms) differs by 3.1e-10 between
  the same float64 brute force run one row at a time and batched, while the predictions agree to
  1.3e-14. Where such rows occur, ``algebraic_rtol`` measures the reference's own rounding spread
  (the same brute force in a second evaluation order) and allows 10 x that, never less than
  ALGEBRAIC_RTOL: a real error (a wrong row, timestep or target) is 1e-3 or more.
- FLOAT32_FORWARD_RTOL bounds two float32 evaluations of the same forward quantity (UNet outputs,
  residual norms; no kink): A = 1e3 (6 x the largest forward amplification seen) gives 6e-5 of the
  output scale; the tests use 1e-3 relative with an absolute floor FLOAT32_FORWARD_ATOL = 1e-5 for
  elements near 0.
- float32_dot_bound(a, b): the deterministic bound (Higham, Accuracy and Stability, 3.1) on each
  entry of a @ b.T computed in float32 from float64 inputs, whatever the summation order or thread
  count: rounding a and b to float32 and n products accumulated in float32 err by at most
  gamma_{n+2} (|a| @ |b|.T), gamma_m = m u32 / (1 - m u32). A sign of an entry smaller than this
  bound is not determined by float32 arithmetic, so tests compare signs only above it.
- A float64 value stored as float32 is off by at most u32 relative (round to nearest): FLOAT32_STORE_RTOL
  = 4 u32 allows for the float64 algorithms on the two sides (Cholesky solve vs inverse; cond < 1e3,
  so < 1e-12 relative) on top of that.
- sampler_atol(steps, guidance) bounds two float32 runs of a sampling loop (latents of scale <= 3)
  that differ in batch shape: each of S steps adds one forward's rounding difference, amplified by the
  guidance (1 + g), to the latents: S (1 + g) A u |x| with A = 200 for one forward pass (174 seen).
  For 8 steps at g = 4: 1.4e-3 (seen: 3.6e-6 with one thread, 4.8e-6 with two: errors of successive
  steps do not add up coherently, so the bound is loose).
"""

from __future__ import annotations

import torch

from das_sd.registry import METHODS

U32 = 2.0 ** -24
ALGEBRAIC_RTOL = 1e-10
FLOAT32_STORE_RTOL = 4 * U32
FLOAT32_FORWARD_RTOL = 1e-3
FLOAT32_FORWARD_ATOL = 1e-5


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, in float64."""
    got, expected = got.double(), expected.double()
    return ((got - expected).norm() / expected.norm()).item()


def algebraic_rtol(reference: torch.Tensor, other_order: torch.Tensor) -> float:
    """The float64 bound of an algebraic claim checked against ``reference``: ALGEBRAIC_RTOL, or 10 x
    the reference's own rounding spread (``other_order``: the same brute force evaluated in another
    order, e.g. batched) when that is larger (ill-conditioned rows, see the module docstring)."""
    return max(ALGEBRAIC_RTOL, 10 * relative_error(other_order, reference))


def sampler_atol(steps: int, guidance: float, scale: float = 3.0) -> float:
    """Largest expected difference between two float32 sampling runs of ``steps`` steps."""
    return steps * (1 + guidance) * 200 * U32 * scale


def float32_dot_bound(a, b):
    """Entry-wise bound on |fl32(a @ b.T) - a @ b.T| for float64 arrays a (m, n), b (p, n) (numpy or torch)."""
    n = a.shape[1]
    gamma = (n + 2) * U32 / (1 - (n + 2) * U32)
    return gamma * (abs(a) @ abs(b).T)


def assert_ranked_up_to_rounding(indices: torch.Tensor, exact: torch.Tensor, slack: torch.Tensor) -> None:
    """``indices`` (q, top) rank ``exact`` (q, N) scores best first, up to ties within ``slack`` (q, 1):
    the j-th index's exact score is within 2 slack of the j-th best exact score (two scores closer
    than the rounding of either may come in either order)."""
    best = exact.sort(dim=1, descending=True).values[:, :indices.shape[1]]
    assert (exact.gather(1, indices) >= best - 2 * slack).all()
    assert all(len(set(row)) == len(row) for row in indices.tolist())


def score_slack(name: str, q: torch.Tensor, psi: torch.Tensor, relative: float = 0.0) -> torch.Tensor:
    """Per query, the largest rounding error of a float32 score (t for signed methods, t^2 for das):
    |dt| <= float32_dot_bound (+ ``relative`` |q| |psi| for vectors stored with that relative error)."""
    q, psi = q.double(), psi.double()
    t = q @ psi.T
    delta = float32_dot_bound(q, psi) + relative * (q.abs() @ psi.abs().T)
    if METHODS[name].squared:
        delta = delta * (2 * t.abs() + delta)
    return delta.max(dim=1, keepdim=True).values
