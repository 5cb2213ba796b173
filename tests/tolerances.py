"""Tolerances of the numerical tests, and the error analysis they come from.

Unit roundoff: u32 = 2^-24 = 6.0e-8 (float32), u64 = 2^-53 = 1.1e-16 (float64).

Two evaluations of the same quantity that differ only in how the work is batched (one row vs a
batch, a LoRA merged by hand vs applied by peft, 1 vs 2 threads) run other BLAS blockings and
reduction orders, so they differ by rounding: relative difference <= A * u, with A the error
amplification of the computation. For the tiny UNet's projected LoRA gradients (a forward and a
backward through ~20 layers with inner dimensions up to 256) A is about 10^3, in either precision:
float32 relative differences between das-sd's batched features and a one-row autograd loop were
2.8e-6 .. 5.6e-5 here (A <= 940), 1.47e-4 on another machine of the same kind (a clean clone failed
a 1e-4 bound); float64 ones at most 7.8e-14 (A <= 700) over every algebraic test below, with
OMP_NUM_THREADS=1 and 2.

Kinks: f = l1 differentiates |eps_theta|. An element of the prediction within delta ~ A u |eps| of 0
can take opposite signs in the two evaluations, which changes that row's gradient by 2 J_j / N
(N = 256 elements): O(1 / sqrt(N)) relative, far above any rounding bound. The chance of a flip per
element is about 2 delta / (sqrt(2 pi) sigma) ~ 0.8 A u: in float32 about 1e-4 with A = 2,500, so a
test over 3 samples x 3 timesteps x 256 elements (~2,300 elements) meets a flip in about one run out
of four. In float64, with A as large as 1e5, the chance per test is 0.8 * 1e5 * 1.1e-16 * 2,300 =
2e-8. Hence:

- ALGEBRAIC claims (batched = one-by-one autograd, projected = P^T brute force, shared forward =
  separate forward) are checked in float64 with ALGEBRAIC_RTOL = 1e-10: 9 x above A = 1e5 (100 x the
  amplification measured) times u64, and 1,300 x the largest difference seen.
- FLOAT32_FORWARD_RTOL bounds two float32 evaluations of the same forward quantity (UNet outputs,
  residual norms; no kink, no backward, so A is at most that of forward + backward): A <= 1e4 gives
  6e-4; the tests use 1e-3 relative, with an absolute floor FLOAT32_FORWARD_ATOL = 1e-5 for outputs
  of unit scale whose individual elements may be near 0.
- sampler_atol(steps, guidance) bounds two float32 runs of a sampling loop (latents of scale <= 3)
  that differ in batch shape: each of S steps adds the forward's rounding difference, amplified by
  the guidance (1 + g), to the latents: S (1 + g) A u |x| with A = 1e2 for one forward pass. For 8
  steps at g = 4: 7.2e-4 (seen: 3.6e-6 with one thread, 4.8e-6 with two).
"""

from __future__ import annotations

import torch

ALGEBRAIC_RTOL = 1e-10
FLOAT32_FORWARD_RTOL = 1e-3
FLOAT32_FORWARD_ATOL = 1e-5


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, in float64."""
    got, expected = got.double(), expected.double()
    return ((got - expected).norm() / expected.norm()).item()


def sampler_atol(steps: int, guidance: float, scale: float = 3.0) -> float:
    """Largest expected difference between two float32 sampling runs of ``steps`` steps."""
    return steps * (1 + guidance) * 1e2 * 2.0 ** -24 * scale
