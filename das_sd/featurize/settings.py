"""Featurizer settings (docs/method.md §4-§9), recorded in every feature store's manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..registry import OUTPUT_FUNCTIONS, PROJECTOR_KINDS, RESIDUAL_FORMS, check_choice
from ..seeds import generator


@dataclass
class FeaturizerSettings:
    output: str = "l1"  # f: mean | l1 | square | loss (open; l1 ties square and beats mean on the demo tune split)
    num_timesteps: int = 20  # K (chosen on the tune split: R@10 0.706 at K=10, 0.799 at 20, 0.806 at 40)
    timesteps: list[int] | None = None  # explicit T_K; None: a uniform grid over the schedule
    noise_seed: int = 0
    normalize: bool = True  # per-timestep unit normalisation of g_{z,t} (open)
    projector: str = "sparse"  # sparse | rademacher | gaussian (das_sd.projection)
    projection_dim: int = 2048  # k
    projection_seed: int = 0
    projection_nonzeros: int = 4  # s, nonzeros per input coordinate of the sparse projector
    residual: str = "scale-free"  # e_i form: scale-free | magnitude | none (open)
    residual_timesteps: int = 100  # T_E

    def __post_init__(self):
        check_choice("output function", self.output, OUTPUT_FUNCTIONS)
        check_choice("projector kind", self.projector, PROJECTOR_KINDS)
        check_choice("residual form", self.residual, RESIDUAL_FORMS)
        if self.num_timesteps < 1 or self.projection_dim < 1:
            raise ValueError("num_timesteps and projection_dim must be positive")
        if self.projector == "sparse" and (self.projection_nonzeros < 1 or self.projection_dim % self.projection_nonzeros):
            raise ValueError(f"sparse projector: projection_dim (--dim {self.projection_dim}) must be a multiple "
                             f"of projection_nonzeros (--projection-nonzeros {self.projection_nonzeros})")

    def feature_timesteps(self, num_train_timesteps: int) -> list[int]:
        if self.timesteps is not None:
            return [int(t) for t in self.timesteps]
        return uniform_grid(self.num_timesteps, num_train_timesteps)

    def residual_grid(self, num_train_timesteps: int) -> list[int]:
        return uniform_grid(self.residual_timesteps, num_train_timesteps)

    def to_dict(self) -> dict:
        return asdict(self)


def uniform_grid(count: int, num_train_timesteps: int) -> list[int]:
    """``count`` timesteps evenly spread over [0, T-1], both ends included."""
    return [int(t) for t in np.unique(np.rint(np.linspace(0, num_train_timesteps - 1, count)))]


def noise_for(seed: int, key: str, timestep: int, shape: tuple[int, ...]) -> torch.Tensor:
    """eps_{z,t}: a function of (seed, sample key, t) only, never of batch size or position."""
    return torch.randn(shape, generator=generator(f"das-sd-noise:{seed}:{key}:{timestep}"))


def output_function(name: str, prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """f per row of a batch of UNet predictions: a (rows,) tensor."""
    dims = tuple(range(1, prediction.ndim))
    if name == "mean":
        return prediction.mean(dim=dims)
    if name == "l1":
        return prediction.abs().mean(dim=dims)
    if name == "square":
        return prediction.pow(2).mean(dim=dims)
    if name == "loss":
        return (prediction - noise).pow(2).mean(dim=dims)
    check_choice("output function", name, OUTPUT_FUNCTIONS)
    raise NotImplementedError(f"output function {name!r} is listed in das_sd.registry but not implemented here")
