"""The choices and defaults that several faces offer, each written once: the attribution methods,
the featurizer's output functions, projector kinds and residual forms, prediction types, index storage dtypes,
autocast flags and the lambda rule's default rho.

Torch-free (standard library only): the webui and ComfyUI plugins read their method lists from here
at start-up, when loading torch would slow down or break the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One attribution method: which stored features it scores and how (``docs/method.md §11``).

    Attributes:
        name: The method's name, as CLI flags and settings spell it (e.g. ``"das"``).
        feature_set: The feature set it scores with (``"das"``, ``"dtrak"``, ``"trak"``), or
            None for latent similarity (no gradient features).
        kernel: Whether the train-side vectors are solved with G^-1 (False: no kernel, as tracin).
        residual: Whether they carry the residual weight e_i.
        leverage: Whether they carry the leverage factor 1 / (1 - h_i).
        squared: Whether images rank by t^2 (the sign of t reported beside it); otherwise by signed t.
        description: One line for help texts.
    """

    name: str
    feature_set: str | None  # None: latent similarity, no gradient features
    kernel: bool  # use G^-1
    residual: bool
    leverage: bool
    squared: bool  # ranked by t^2 (the sign of t reported beside it); otherwise by the signed t
    description: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("das", "das", True, True, True, True, "DAS: (phi_q^T G^-1 phi_i e_i / (1 - h_i))^2, sign reported"),
    Method("das-signed", "das", True, True, True, False, "DAS without squaring: the signed leave-one-out effect"),
    Method("das-noleverage", "das", True, True, False, True, "DAS without the 1 / (1 - h_i) leverage factor"),
    Method("dtrak", "dtrak", True, False, False, False, "D-TRAK: phi_q^T G^-1 phi_i with f = mean(eps^2)"),
    Method("trak", "trak", True, False, False, False, "TRAK for diffusion: phi_q^T G^-1 phi_i with f = L_simple"),
    Method("tracin", "das", False, False, False, False, "TracIn / gradient dot product phi_q^T phi_i"),
    Method("latent-sim", None, False, False, False, False, "cosine similarity of the latents (no gradients)"),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
# the methods that score with projected LoRA gradients (every one but the latent-similarity baseline)
GRADIENT_METHOD_NAMES: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.feature_set is not None)
# the leverage factor 1 / (1 - h_i) did not earn its place on either tune split (docs/evaluation.md): at the
# default rho = 3 it lowered the LDS tune halves' pooled LDS (0.3215 with, 0.3240 without) and the planted
# ground truth's tune mAP (0.779 with, 0.783 without); at no rho of the grid did it help on both
DEFAULT_METHOD = "das-noleverage"
# the gradient feature sets a store can hold, each scored by one or more methods
FEATURE_SETS: tuple[str, ...] = tuple(dict.fromkeys(m.feature_set for m in METHODS.values() if m.feature_set))

OUTPUT_FUNCTIONS: tuple[str, ...] = ("mean", "l1", "square", "loss")  # f of a feature set
PROJECTOR_KINDS: tuple[str, ...] = ("sparse", "rademacher", "gaussian")  # das_sd.projection
# e_i; "signed": a vector, the per-timestep residual gradients (docs/method.md §9)
RESIDUAL_FORMS: tuple[str, ...] = ("scale-free", "magnitude", "none", "signed")
# what a UNet predicts (its scheduler config's prediction_type): the target of training, f = loss and
# the residuals (das_sd.noising.training_target); a store records it
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
# model families (das_sd.conditioning: what the UNet is conditioned on); a store records its own
MODEL_FAMILIES: tuple[str, ...] = ("sd", "sdxl")
FAMILY_NAMES: dict[str, str] = {"sd": "SD 1.x / 2.x", "sdxl": "SDXL"}

INDEX_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")  # storage of the train-side vectors
DEFAULT_INDEX_DTYPE = "float32"
# --autocast flag -> the compute dtype a store records (float32: no autocast)
AUTOCAST_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_AUTOCAST = "fp32"

# lambda = rho * trace(Phi^T Phi) / min(N, k), the mean non-zero eigenvalue (das_sd.score.LambdaRule). Two
# tune splits, both disjoint from what is reported (docs/evaluation.md "Choosing the defaults"), disagree: the
# M = 64 LDS run's tune halves prefer rho = 1 (das-noleverage pooled LDS 0.327), the planted ground truth's
# tune split rho = 10 (mAP 0.818). rho = 3 keeps both within 4.3 % of their best (LDS 0.324, mAP 0.783); the
# other rho of the grid {0.1, 0.3, 1, 3, 10, 30, 100} fall further below on one of them (rho = 10: 6.1 %)
DEFAULT_RHO = 3.0


def check_choice(flag_or_field: str, value: object, choices: Iterable[str]) -> None:
    """ValueError naming ``flag_or_field`` (a CLI flag, a settings field) and the choices when
    ``value`` is not one of them.

    Args:
        flag_or_field: What the value was given as, e.g. ``"--dtype"``; starts the error message.
        value: The value to check.
        choices: The allowed values.

    Raises:
        ValueError: ``value`` is not one of ``choices``.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{flag_or_field} {value!r}: expected one of {', '.join(choices)}")


def method(name: str) -> Method:
    """The method called ``name``; ValueError naming the choices for any other name.

    Args:
        name: A method name, one of ``METHOD_NAMES``.

    Returns:
        The registry's ``Method``.

    Raises:
        ValueError: ``name`` is not a known method (or not a string key at all).
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None
