"""Dataset -> latents and captions -> embeddings: the frozen encoders, shared by training and featurizing.

x_0 = vae.encode(img).latent_dist.mode() * scaling_factor (the mode, not a sample, so that a
sample's latent is deterministic); c = text_encoder(tokens)[0] padded to the tokenizer's length.
"""

from __future__ import annotations

import numpy as np
import torch

from .data.datasets import Dataset, Sample
from .data.images import to_model_input


def native_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def encode_images(pipe, dataset: Dataset, resolution: int, batch_size: int = 64,
                  samples: list[Sample] | None = None) -> torch.Tensor:
    """Latents x_0 of ``samples`` (default: all of ``dataset``), in order."""
    samples = dataset.samples if samples is None else samples
    device, dtype = pipe.vae.device, pipe.vae.dtype
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        pixels = np.stack([to_model_input(dataset.load_image(s), resolution) for s in chunk])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device, dtype)
        out.append(pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor)
    return torch.cat(out).float()


def tokenize_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(pipe.text_encoder(tokenize_prompts(pipe, prompts[i:i + batch_size]))[0])
    return torch.cat(out).float()
