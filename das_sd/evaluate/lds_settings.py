"""The settings of an LDS run (docs/method.md §15): how many subsets, how each retrained model's
output is measured, how the queries are split to choose lambda.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LDSSettings:
    """Settings of an LDS run (docs/method.md §15).

    Attributes:
        subsets: M, the number of random training subsets retrained on.
        fraction: Share of the training samples in each subset (round(fraction N), at least 1).
        repeats: LoRAs retrained per subset, with different seeds; their outputs are averaged.
        subset_seed: Seed of the subset draw.
        output_timesteps: Timesteps of the uniform grid that L_simple is averaged over.
        output_noise_draws: Noise draws per timestep of that average.
        output_seed: Seed of those noise draws.
        bootstrap: Resamples of the queries for the 95 % interval.
        tune_fraction: Share of each query set held out to choose lambda (never reported); 0: no tune part.
        split_seed: Seed of the tune / reported split of each query set.
        rho_grid: The rho tried for each kernel method (lambda = rho trace / min(N, k), das_sd.ridge).
    """
    subsets: int = 16  # M (the papers use 64)
    fraction: float = 0.5
    repeats: int = 1  # LoRAs per subset (different seeds), outputs averaged
    subset_seed: int = 0
    output_timesteps: int = 50  # timesteps of the L_simple average
    output_noise_draws: int = 4  # noise draws per timestep
    output_seed: int = 0
    bootstrap: int = 1000
    tune_fraction: float = 0.5  # of each query set, held out to choose lambda (never reported)
    split_seed: int = 0
    rho_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # lambda = rho trace / min(N, k)
