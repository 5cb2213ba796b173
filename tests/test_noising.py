"""The forward noising x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (das_sd/noising.py)."""

from __future__ import annotations

import torch

from das_sd.noising import noisy_latents


def test_each_row_is_noised_at_its_own_timestep():
    g = torch.Generator().manual_seed(0)
    abar = torch.linspace(0.99, 0.01, 10)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 9, 4])
    got = noisy_latents(x0, eps, t, abar)
    for i in range(3):  # in float64, row by row, from the formula
        a = float(abar[t[i]])
        expected = a ** 0.5 * x0[i].double() + (1 - a) ** 0.5 * eps[i].double()
        assert torch.allclose(got[i].double(), expected, rtol=0, atol=1e-6)
    assert got.dtype == torch.float32


def test_abar_is_taken_in_the_dtype_of_x0():
    abar = torch.tensor([0.3, 0.7])  # float32, as schedulers hold it
    x0, eps = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    got = noisy_latents(x0, eps, torch.tensor([1, 0]), abar)
    assert got.dtype == torch.float64
    assert torch.equal(got[:, 0], torch.stack([abar[1].double().sqrt(), abar[0].double().sqrt()]))
