"""Dataset -> latents and captions -> embeddings: the frozen encoders, shared by training and featurizing.

x_0 = vae.encode(img).latent_dist.mode() * scaling_factor (the mode, not a sample, so that a
sample's latent is deterministic); c = text_encoder(tokens)[0] padded to the tokenizer's length
(SDXL: both encoders and the size conditioning, ``das_sd.conditioning``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .data.datasets import Dataset, Sample
from .data.buckets import resize_to_bucket
from .data.images import to_model_input, to_rgb
from .conditioning import Conditioning, model_family, text_states
from .memory import memory_budget, rows_per_pass, saved_bytes

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def native_resolution(pipe: StableDiffusionPipeline) -> int:
    """The image size in pixels the pipeline's UNet was built for (its sample size times the VAE's
    downscaling factor, e.g. 512 for SD 1.5).

    Args:
        pipe: A loaded Stable Diffusion pipeline.

    Returns:
        The side length of a square model input, in pixels.
    """
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def encode_images(pipe: StableDiffusionPipeline, dataset: Dataset, resolution: int, batch_size: int = 64,
                  samples: list[Sample] | None = None, max_memory: int | None = None,
                  bucket: tuple[int, int] | None = None) -> torch.Tensor:
    """Latents x_0 of ``samples`` (default: all of ``dataset``), in order: the VAE posterior's mode
    times its scaling factor (``docs/method.md §2``).

    Args:
        pipe: The pipeline whose VAE encodes; images go to its device and dtype.
        dataset: The dataset that loads each sample's image.
        resolution: Side in pixels each image is resized and center-cropped to.
        batch_size: Most images per VAE call.
        samples: The samples to encode, from ``dataset``; None (default): all of them.
        max_memory: Bytes one VAE call may take; fewer images go per call when ``batch_size`` would
            not fit (one image's encoder activations measured once). None: most of what the device
            has free.
        bucket: Encode at this (width, height) instead, each image resized to cover it and
            center-cropped (``data.buckets.resize_to_bucket``); None: the ``resolution`` square.

    Returns:
        (N, C, resolution / f, resolution / f) float32 latents on the VAE's device, f the VAE's
        downscaling factor (8 for SD).
    """
    samples = dataset.samples if samples is None else samples
    device, dtype = pipe.vae.device, pipe.vae.dtype
    if len(samples) > 1 and batch_size > 1:
        batch_size = _images_per_call(pipe, resolution, min(batch_size, len(samples)), max_memory)
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        pixels = np.stack([to_model_input(dataset.load_image(s), resolution) if bucket is None else
                           np.asarray(resize_to_bucket(to_rgb(dataset.load_image(s)), bucket), np.float32) / 127.5 - 1.0
                           for s in chunk])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device, dtype)
        out.append(pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor)
    return torch.cat(out).float()


def _images_per_call(pipe: StableDiffusionPipeline, resolution: int, most: int, max_memory: int | None) -> int:
    """Images per VAE encode within the budget: what one image's encoder keeps for a backward bounds
    what it holds without one. Measured on each call (one image's encode, small beside the UNet
    passes that follow), so that no cache outlives the caller's VAE."""
    x = torch.zeros(1, 3, resolution, resolution, device=pipe.vae.device, dtype=pipe.vae.dtype)
    with torch.inference_mode(False):
        one_image = saved_bytes(lambda: pipe.vae.encode(x).latent_dist.mode())
    return rows_per_pass(memory_budget(pipe.vae.device, max_memory), one_image, most)


def text_encoders(pipe: StableDiffusionPipeline) -> list:
    """The pipeline's text encoders, in conditioning order: SD one, SDXL two.

    Args:
        pipe: A loaded pipeline.

    Returns:
        [text_encoder] or [text_encoder, text_encoder_2].
    """
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if model_family(pipe) == "sdxl" else [])


def tokenize_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids of ``prompts`` for each text encoder, padded (or truncated) to its tokenizer's
    maximum length.

    Args:
        pipe: The pipeline whose tokenizers and text encoders are used.
        prompts: The captions or prompts.

    Returns:
        One (N, L) id tensor per text encoder (``text_encoders``), on that encoder's device, L the
        tokenizer's ``model_max_length``.
    """
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if model_family(pipe) == "sdxl" else [])
    return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids.to(encoder.device)
            for tok, encoder in zip(tokenizers, text_encoders(pipe))]


def native_time_ids(pipe: StableDiffusionPipeline, size: tuple[int, int] | None = None) -> torch.Tensor:
    """SDXL's size conditioning of an image generated (or featurized) at ``size`` without crop: what
    the SDXL pipelines pass by default (original = target size, crop (0, 0)).

    Args:
        pipe: The pipeline.
        size: (width, height) in pixels; None: the native square.

    Returns:
        (6,) float32: (height, width, 0, 0, height, width).
    """
    width, height = size or (native_resolution(pipe),) * 2
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str], batch_size: int = 256,
                   time_ids: torch.Tensor | None = None) -> torch.Tensor | Conditioning:
    """The UNet conditioning of ``prompts`` (``docs/method.md §2``): SD's text states
    c = text_encoder(tokens)[0]; SDXL's ``Conditioning`` (both encoders' penultimate states, the
    pooled embedding, and size conditioning).

    Args:
        pipe: The pipeline whose tokenizers and text encoders (with any LoRA loaded) are used.
        prompts: The captions or prompts.
        batch_size: Prompts per text-encoder call.
        time_ids: SDXL only: (N, 6) or (6,) size conditioning; None: ``native_time_ids(pipe)``.

    Returns:
        SD: (N, L, D) float32 embeddings on the text encoder's device. SDXL: a float32
        ``Conditioning`` of N rows on that device.
    """
    family = model_family(pipe)
    encoders = text_encoders(pipe)
    parts = [text_states(encoders, tokenize_prompts(pipe, prompts[i:i + batch_size]), family)
             for i in range(0, len(prompts), batch_size)]
    if family == "sd":
        return torch.cat(parts).float()
    hidden, pooled = torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts]).float()
    ids = native_time_ids(pipe) if time_ids is None else time_ids
    return Conditioning(hidden, pooled, ids.to(hidden.device).float().expand(len(prompts), 6).clone()
                        if ids.dim() == 1 else ids.to(hidden.device).float())
