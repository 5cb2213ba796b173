"""Featurizer settings (docs/method.md §4-§9), recorded in every feature store's manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..projection import ProjectorSpec
from ..registry import OUTPUT_FUNCTIONS, PROJECTOR_KINDS, RESIDUAL_FORMS, check_choice
from ..seeds import generator


@dataclass
class FeaturizerSettings:
    """How one feature set is computed (docs/method.md §4-§9); recorded in a store's identity.

    Attributes:
        output: The output function f of the UNet prediction (§5): "mean", "l1" (default), "square"
            or "loss".
        num_timesteps: K, the number of feature timesteps on a uniform grid over the schedule (§4);
            unused when ``timesteps`` is given.
        timesteps: An explicit T_K; None for the uniform grid of ``num_timesteps``.
        noise_seed: Seed of the feature and residual noise eps_{z,t} (§4).
        normalize: Divide each row's gradient by its (unprojected) norm before averaging over T_K (§8).
        projector: Kind of random projection P (§7): "sparse" (default), "rademacher" or "gaussian".
        projection_dim: k, the length of a feature vector.
        projection_seed: Seed of P (§7).
        projection_nonzeros: s, nonzeros per input coordinate of the sparse projector; must divide
            ``projection_dim``.
        residual: Form of the residual weight e_i (§9): "scale-free" (default), "magnitude", "none",
            or "signed" (a vector: each feature row's residual gradient J^T r, residual_timesteps 0).
        residual_timesteps: T_E, the number of timesteps the residual weight averages over (§9);
            0 (default): the feature timesteps T_K, whose errors the featurizing forward already
            computes, so the residual weights cost no extra forward.

    Raises:
        ValueError: On construction, when a choice is not one of das_sd.registry's, ``num_timesteps``
            or ``projection_dim`` is below 1, the "signed" residual has ``residual_timesteps``, or the
            sparse projector's ``projection_dim`` is not a multiple of ``projection_nonzeros``.
    """

    output: str = "l1"  # f: mean | l1 | square | loss (open; l1 ties square and beats mean on the demo tune split)
    num_timesteps: int = 20  # K (chosen on the tune split: R@10 0.706 at K=10, 0.799 at 20, 0.806 at 40)
    timesteps: list[int] | None = None  # explicit T_K; None: a uniform grid over the schedule
    noise_seed: int = 0
    normalize: bool = True  # per-timestep unit normalisation of g_{z,t} (open)
    # P's defaults are the projector's own (das_sd.projection.ProjectorSpec)
    projector: str = ProjectorSpec.kind  # sparse | rademacher | gaussian
    projection_dim: int = ProjectorSpec.dim  # k
    projection_seed: int = ProjectorSpec.seed
    projection_nonzeros: int = ProjectorSpec.nonzeros  # s, nonzeros per input coordinate of the sparse projector
    residual: str = "scale-free"  # e_i form: scale-free | magnitude | none | signed (open)
    residual_timesteps: int = 0  # T_E; 0: the feature timesteps, from the featurizing forward

    def __post_init__(self):
        check_choice("output function", self.output, OUTPUT_FUNCTIONS)
        check_choice("projector kind", self.projector, PROJECTOR_KINDS)
        check_choice("residual form", self.residual, RESIDUAL_FORMS)
        if self.num_timesteps < 1 or self.projection_dim < 1:
            raise ValueError("num_timesteps and projection_dim must be positive")
        if self.residual_timesteps < 0:
            raise ValueError("residual_timesteps must be 0 (the feature timesteps) or positive")
        if self.residual == "signed" and self.residual_timesteps:
            raise ValueError(f"residual form 'signed' weights the feature rows' own gradients: residual_timesteps "
                             f"(--residual-timesteps {self.residual_timesteps}) must be 0")
        if self.projector == "sparse" and (self.projection_nonzeros < 1 or self.projection_dim % self.projection_nonzeros):
            raise ValueError(f"sparse projector: projection_dim (--dim {self.projection_dim}) must be a multiple "
                             f"of projection_nonzeros (--projection-nonzeros {self.projection_nonzeros})")

    def feature_timesteps(self, num_train_timesteps: int) -> list[int]:
        """The feature timesteps T_K (docs/method.md §4).

        Args:
            num_train_timesteps: T, the scheduler's number of training timesteps (1000 for SD 1.x).

        Returns:
            ``timesteps`` when given, else ``uniform_grid(num_timesteps, num_train_timesteps)``.
        """
        if self.timesteps is not None:
            return [int(t) for t in self.timesteps]
        return uniform_grid(self.num_timesteps, num_train_timesteps)

    def residual_grid(self, num_train_timesteps: int) -> list[int]:
        """The T_E timesteps of the residual weight (docs/method.md §9).

        Args:
            num_train_timesteps: T, the scheduler's number of training timesteps.

        Returns:
            ``uniform_grid(residual_timesteps, num_train_timesteps)``; the feature timesteps when
            ``residual_timesteps`` is 0.
        """
        if self.shares_forward:
            return self.feature_timesteps(num_train_timesteps)
        return uniform_grid(self.residual_timesteps, num_train_timesteps)

    @property
    def shares_forward(self) -> bool:
        """Whether the residual weights come from the featurizing forward (``residual_timesteps`` 0).

        Returns:
            True when residuals are wanted and T_E is the feature timesteps.
        """
        return self.residual != "none" and self.residual_timesteps == 0

    def projector_spec(self) -> ProjectorSpec:
        """The random projection P these settings describe (docs/method.md §7).

        Returns:
            A ``ProjectorSpec`` of kind ``projector``, dim ``projection_dim``, seed ``projection_seed``
            and ``projection_nonzeros`` nonzeros.
        """
        return ProjectorSpec(self.projector, self.projection_dim, self.projection_seed, self.projection_nonzeros)

    def to_dict(self) -> dict:
        """The settings as a plain, JSON-ready dict of field name to value (as a store records them).

        Returns:
            One entry per field.
        """
        return asdict(self)


def uniform_grid(count: int, num_train_timesteps: int) -> list[int]:
    """``count`` timesteps evenly spread over [0, T-1], both ends included (docs/method.md §4).

    Args:
        count: How many timesteps to ask for; fewer come back when rounding makes some equal.
        num_train_timesteps: T, the scheduler's number of training timesteps.

    Returns:
        The distinct rounded timesteps, ascending (e.g. 0, 53, ..., 999 for 20 of 1000).
    """
    return [int(t) for t in np.unique(np.rint(np.linspace(0, num_train_timesteps - 1, count)))]


def noise_for(seed: int, key: str, timestep: int, shape: tuple[int, ...]) -> torch.Tensor:
    """eps_{z,t}: a function of (seed, sample key, t) only, never of batch size or position.

    See docs/method.md §4. Drawn on the CPU, so it is the same on every machine.

    Args:
        seed: The settings' ``noise_seed``.
        key: The sample's key (``data.datasets.sample_key``), or the query key for queries.
        timestep: The timestep t.
        shape: Shape of one latent, e.g. (4, 64, 64).

    Returns:
        Standard normal noise of ``shape``, float32 on the CPU.
    """
    return torch.randn(shape, generator=generator(f"das-sd-noise:{seed}:{key}:{timestep}"))


def output_function(name: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """f per row of a batch of UNet predictions (docs/method.md §5).

    Args:
        name: The output function: "mean", "l1", "square" or "loss".
        prediction: The UNet's predictions, (rows, C, H, W).
        target: The rows' training target (das_sd.noising.training_target: the noise for an epsilon
            model, the velocity for a v-prediction one), same shape; read only by "loss".

    Returns:
        f of each row, (rows,), in the predictions' dtype.

    Raises:
        ValueError: When ``name`` is not one of das_sd.registry.OUTPUT_FUNCTIONS.
        NotImplementedError: When the registry lists ``name`` but this function has no case for it.
    """
    dims = tuple(range(1, prediction.ndim))
    if name == "mean":
        return prediction.mean(dim=dims)
    if name == "l1":
        return prediction.abs().mean(dim=dims)
    if name == "square":
        return prediction.pow(2).mean(dim=dims)
    if name == "loss":
        return (prediction - target).pow(2).mean(dim=dims)
    check_choice("output function", name, OUTPUT_FUNCTIONS)
    raise NotImplementedError(f"output function {name!r} is listed in das_sd.registry but not implemented here")
