"""What the UNet is conditioned on, per row: the model families das-sd supports and their conditioning.

- SD 1.x / 2.x ("sd"): the text encoder's last hidden states c, (n, tokens, dim).
- SDXL ("sdxl"): the penultimate hidden states of both text encoders, concatenated along the feature
  axis, (n, 77, 768 + 1280); the second encoder's projected pooled embedding, (n, 1280); and the
  size conditioning ``time_ids`` = (original height, original width, crop top, crop left, target
  height, target width), (n, 6), as SDXL and its LoRA trainers (diffusers' train_text_to_image_lora_sdxl,
  kohya's sdxl_train_network) feed them (docs/method.md §2).

SD rows travel as plain tensors, SDXL rows as ``Conditioning``; both index, move and repeat alike,
and ``unet_kwargs`` turns either into the UNet's keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .data.images import cover_crop
from .registry import FAMILY_NAMES, MODEL_FAMILIES  # noqa: F401  (the families, named here too)

if TYPE_CHECKING:
    from torch import nn



def model_family(pipe_or_unet: object) -> str:
    """The model family of a pipeline or UNet: "sdxl" when the UNet takes SDXL's added text / time
    conditioning, else "sd".

    Args:
        pipe_or_unet: A diffusers pipeline (its ``unet``) or a ``UNet2DConditionModel``.

    Returns:
        "sd" or "sdxl" (``MODEL_FAMILIES``).
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd"


@dataclass(frozen=True)
class Conditioning:
    """SDXL's conditioning of n rows; indexes, moves and repeats like a tensor of n rows.

    Attributes:
        hidden: (n, tokens, dim) text states (both encoders' penultimate states, concatenated).
        pooled: (n, pooled_dim) the second text encoder's projected pooled embedding.
        time_ids: (n, 6) original size, crop top-left and target size, each (height, width).
    """
    hidden: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning(fn(self.hidden), fn(self.pooled), fn(self.time_ids))

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index: object) -> "Conditioning":
        """The rows ``index`` selects (an int keeps a row axis of 1).

        Args:
            index: Anything a tensor's first axis takes: slice, list, index tensor, int.

        Returns:
            The selected rows.
        """
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])

    @property
    def shape(self) -> torch.Size:
        """The text states' shape, (n, tokens, dim)."""
        return self.hidden.shape

    @property
    def device(self) -> torch.device:
        """The device the tensors are on."""
        return self.hidden.device

    def to(self, *args: object, **kwargs: object) -> "Conditioning":
        """Every tensor moved / cast as ``torch.Tensor.to(*args, **kwargs)`` would (all are floats).

        Args:
            *args: ``torch.Tensor.to`` positional arguments.
            **kwargs: ``torch.Tensor.to`` keyword arguments.

        Returns:
            The moved conditioning.
        """
        return self._map(lambda t: t.to(*args, **kwargs))

    def clone(self) -> "Conditioning":
        """Plain copies of every tensor (tensors made under inference_mode cannot enter autograd).

        Returns:
            The copy.
        """
        return self._map(torch.Tensor.clone)

    def float(self) -> "Conditioning":
        """Every tensor in float32.

        Returns:
            The float32 conditioning.
        """
        return self._map(torch.Tensor.float)

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        """Each row repeated ``repeats`` times in place (rows a, a, b, b, ...).

        Args:
            repeats: Copies of each row.
            dim: Must be 0 (rows).

        Returns:
            The repeated conditioning.

        Raises:
            ValueError: When ``dim`` is not 0.
        """
        if dim != 0:
            raise ValueError("Conditioning repeats rows only (dim=0)")
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def with_time_ids(self, time_ids: torch.Tensor) -> "Conditioning":
        """The same text conditioning with other size conditioning.

        Args:
            time_ids: (n, 6) or (6,) (broadcast to every row).

        Returns:
            The new conditioning.
        """
        time_ids = time_ids.to(self.time_ids.device, self.time_ids.dtype)
        return replace(self, time_ids=time_ids.expand(len(self), 6).clone() if time_ids.dim() == 1 else time_ids)

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """The rows of ``parts`` in order.

        Args:
            parts: Conditionings of the same family and widths.

        Returns:
            The concatenation.
        """
        return Conditioning(*(torch.cat([getattr(p, f) for p in parts]) for f in ("hidden", "pooled", "time_ids")))


def unet_kwargs(cond: torch.Tensor | Conditioning, dtype: torch.dtype) -> dict:
    """The UNet's conditioning keyword arguments for ``cond``, cast to ``dtype``.

    Args:
        cond: SD text states (n, tokens, dim) or an SDXL ``Conditioning``.
        dtype: The UNet's dtype.

    Returns:
        ``{"encoder_hidden_states": ...}``, plus ``added_cond_kwargs`` (``text_embeds``, ``time_ids``)
        for SDXL.
    """
    if isinstance(cond, Conditioning):
        return {"encoder_hidden_states": cond.hidden.to(dtype),
                "added_cond_kwargs": {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}}
    return {"encoder_hidden_states": cond.to(dtype)}


def concat_conditioning(parts: Sequence[torch.Tensor | Conditioning]) -> torch.Tensor | Conditioning:
    """The rows of ``parts`` in order, whichever family.

    Args:
        parts: Tensors or Conditionings, not mixed.

    Returns:
        The concatenation.
    """
    return Conditioning.cat(parts) if isinstance(parts[0], Conditioning) else torch.cat(list(parts))


def size_time_ids(original_sizes: Sequence[tuple[int, int]], target: tuple[int, int]) -> torch.Tensor:
    """SDXL's size conditioning of images resized to cover ``target`` and center-cropped to it, as
    das-sd prepares training images (``data.images.cover_crop``): (original h, original w, crop top,
    crop left, target h, target w) per image, the crop in the resized image's pixels as diffusers'
    and kohya's SDXL trainers record it.

    Args:
        original_sizes: Each image's (width, height) as loaded (after EXIF rotation).
        target: The (width, height) the image is featurized at (the square or its bucket).

    Returns:
        (n, 6) float32.
    """
    rows = []
    for width, height in original_sizes:
        _, (left, top) = cover_crop((width, height), target)
        rows.append([height, width, top, left, target[1], target[0]])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def text_states(text_encoders: Sequence[nn.Module], token_ids: Sequence[torch.Tensor],
                family: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Text conditioning from token ids, with gradients where the encoders have them (a text-encoder
    LoRA in training).

    Args:
        text_encoders: SD: [text_encoder]; SDXL: [text_encoder, text_encoder_2 (with projection)].
        token_ids: One (n, tokens) id tensor per encoder, on its device.
        family: "sd" or "sdxl".

    Returns:
        SD: (n, tokens, dim) last hidden states. SDXL: ((n, tokens, dim_1 + dim_2) penultimate
        hidden states concatenated, (n, pooled_dim) projected pooled embedding of the second encoder).
    """
    if family == "sd":
        return text_encoders[0](token_ids[0])[0]
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
    return torch.cat(states, dim=-1), pooled


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one generation, as the generating host set it: the "original"
    size the model is told the image had, the top-left corner of the crop it is told was taken, and
    the target size. Sizes are (width, height) in pixels, the crop (left, top), as hosts' fields name
    them (webui ``sdxl_crop_left`` / ``sdxl_crop_top``, ComfyUI ``crop_w`` / ``crop_h``).

    Attributes:
        original: (width, height) of the original-size conditioning.
        crop: (left, top) of the crop conditioning.
        target: (width, height) of the target-size conditioning.
    """
    original: tuple[int, int]
    crop: tuple[int, int]
    target: tuple[int, int]

    @staticmethod
    def plain(size: tuple[int, int]) -> "SizeConditioning":
        """What the SDXL pipelines and hosts use when nothing else is set: original = target = the
        generated size, no crop.

        Args:
            size: The generated image's (width, height).

        Returns:
            The size conditioning.
        """
        return SizeConditioning(tuple(size), (0, 0), tuple(size))

    def time_ids(self) -> torch.Tensor:
        """The UNet's ``time_ids`` row in SDXL's order: (original height, original width, crop top,
        crop left, target height, target width).

        Returns:
            (6,) float32.

        Raises:
            ValueError: When a value is not a finite number or a size is not positive.
        """
        (ow, oh), (left, top), (tw, th) = self.original, self.crop, self.target
        row = [oh, ow, top, left, th, tw]
        try:
            values = torch.tensor([float(v) for v in row], dtype=torch.float32)
        except (TypeError, ValueError):
            raise ValueError(f"SDXL size conditioning: not numbers: original {self.original}, crop {self.crop}, "
                             f"target {self.target}") from None
        if not torch.isfinite(values).all() or min(oh, ow, th, tw) <= 0:
            raise ValueError(f"SDXL size conditioning: sizes must be positive and finite: original {self.original}, "
                             f"crop {self.crop}, target {self.target}")
        return values
