"""The forward noising of DDPM training, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, as training
(das_sd.train, the toy base model), featurizing and LDS outputs all compute it: one definition, so
that the rows the featurizer differentiates are noised as the LoRA's training rows were.
"""

from __future__ import annotations

import torch


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t per row: row i of ``x0`` and ``noise`` at timestep ``timesteps[i]``, abar_t taken from
    ``alphas_cumprod`` in x0's dtype (float64 rows are noised in float64), as in ``docs/method.md §2``.
    Stores and trained LoRAs depend on these exact operations, in this order.

    Args:
        x0: Clean latents, (N, C, H, W) (any shape with rows first); their dtype is the result's.
        noise: The noise eps, same shape as ``x0``.
        timesteps: (N,) integer timesteps in ``[0, T)``, indexing ``alphas_cumprod``.
        alphas_cumprod: (T,) the scheduler's abar_t; moved to ``x0``'s device.

    Returns:
        The noised latents x_t, shape and dtype of ``x0``.
    """
    a = alphas_cumprod.to(x0.device)[timesteps].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
