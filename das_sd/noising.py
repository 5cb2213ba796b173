"""The forward noising of DDPM training, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the
target the model learns to predict from x_t, as training (das_sd.train, the toy base model),
featurizing and LDS outputs all compute them: one definition, so that the rows the featurizer
differentiates are noised, and compared with their target, as the LoRA's training rows were.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .models.loading import ModelError
from .registry import PREDICTION_TYPES

__all__ = ["PREDICTION_TYPES", "check_prediction_type", "noisy_latents", "prediction_type", "training_target"]


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
    a = _abar(x0, timesteps, alphas_cumprod)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def training_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the UNet's output is trained to equal for the rows ``noisy_latents`` makes, per the
    scheduler's ``prediction_type`` (docs/method.md §2, "Training target"): the noise eps
    ("epsilon", SD 1.x), the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction",
    SD 2.x 768 px; diffusers' ``DDPMScheduler.get_velocity``), or x_0 itself ("sample").

    Args:
        prediction_type: One of ``PREDICTION_TYPES`` (read it with ``prediction_type``).
        x0: Clean latents, (N, C, H, W) (any shape with rows first); their dtype is the result's.
        noise: The noise eps the rows were noised with, same shape as ``x0``.
        timesteps: (N,) integer timesteps in ``[0, T)``, indexing ``alphas_cumprod``.
        alphas_cumprod: (T,) the scheduler's abar_t; moved to ``x0``'s device.

    Returns:
        The target, shape and dtype of ``x0``.

    Raises:
        ModelError: When ``prediction_type`` is not one of ``PREDICTION_TYPES``.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise.to(x0.dtype)
    if prediction_type == "sample":
        return x0
    a = _abar(x0, timesteps, alphas_cumprod)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def prediction_type(pipe_or_scheduler: object) -> str:
    """The ``prediction_type`` of a pipeline's scheduler config: what its UNet predicts.

    A config without the field is an epsilon model, as diffusers' schedulers read it (SD 1.x
    scheduler configs written before the field existed lack it).

    Args:
        pipe_or_scheduler: A diffusers pipeline (its ``scheduler`` is read), a scheduler (its
            ``config``) or a scheduler config mapping.

    Returns:
        "epsilon", "v_prediction" or "sample".

    Raises:
        ModelError: When the config names another prediction type (e.g. flow matching), which
            das-sd cannot attribute; the message names the value.
    """
    source = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    config = source if isinstance(source, Mapping) else getattr(source, "config", {})
    value = config.get("prediction_type", "epsilon")
    check_prediction_type(value, f"the scheduler config ({type(source).__name__})")
    return value


def check_prediction_type(value: object, where: str = "prediction_type") -> None:
    """Refuse a prediction type das-sd has no training target for.

    Args:
        value: The prediction type to check.
        where: What the value was read from, named in the message.

    Raises:
        ModelError: When ``value`` is not one of ``PREDICTION_TYPES``.
    """
    if value not in PREDICTION_TYPES:
        raise ModelError(f"{where}: prediction_type {value!r} is not supported; das-sd attributes models "
                         f"trained to predict {', '.join(PREDICTION_TYPES)} (the scheduler's prediction_type)")


def _abar(x0: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """abar_t of each row, shaped to broadcast over ``x0``'s row, in ``x0``'s dtype and device."""
    return alphas_cumprod.to(x0.device)[timesteps].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
