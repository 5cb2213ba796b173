"""The model output y_j(x) of LDS (docs/method.md §2, §15): L_simple of each query averaged over a
fixed timestep grid and fixed noise draws, measured for every retrained LoRA and cached as JSON
beside it (an interrupted run resumes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..conditioning import Conditioning, unet_kwargs
from ..featurize.settings import uniform_grid
from ..io import atomic_write_json
from ..noising import noisy_latents, prediction_type, training_target
from ..seeds import generator
from .lds_queries import LDSQueries
from .lds_settings import LDSSettings

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers import StableDiffusionPipeline


@torch.no_grad()
def model_outputs(pipe: StableDiffusionPipeline, latents: torch.Tensor, cond: torch.Tensor | Conditioning, keys: list[str],
                  settings: LDSSettings, batch_size: int = 64) -> np.ndarray:
    """L_simple of each query, averaged over the timestep grid and noise draws (fixed per query key):
    the squared error to the scheduler's training target (docs/method.md §2, §15).

    All (query, timestep, draw) rows go through the UNet in batches: one row's noise depends only on
    its key and timestep, so batching changes nothing but float rounding.

    Args:
        pipe: The pipeline with the (retrained) LoRA loaded; its scheduler config gives the noise
            schedule and the prediction type.
        latents: (Q, 4, h, w) clean query latents x_0.
        cond: The queries' prompt conditioning: (Q, tokens, dim) text states or an SDXL ``Conditioning``.
        keys: One stable id per query; with the timestep it fixes the noise draws.
        settings: Gives ``output_timesteps``, ``output_noise_draws`` and ``output_seed``.
        batch_size: UNet rows per batch (whole (query, timestep) groups of draws, at least one).

    Returns:
        (Q,) float64 averaged L_simple.
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = scheduler.alphas_cumprod
    target_kind = prediction_type(pipe)
    timesteps = uniform_grid(settings.output_timesteps, scheduler.config.num_train_timesteps)
    unet, device = pipe.unet, pipe.unet.device
    draws = settings.output_noise_draws
    rows = [(q, t) for q in range(len(keys)) for t in timesteps]  # each with `draws` noise draws
    losses = np.zeros((len(keys), len(timesteps)))
    per_batch = max(1, batch_size // draws)
    for start in range(0, len(rows), per_batch):
        chunk = rows[start:start + per_batch]
        noise = torch.cat([_output_noise(settings.output_seed, keys[q], t, draws, latents.shape[1:]) for q, t in chunk])
        q_idx = torch.tensor([q for q, _ in chunk]).repeat_interleave(draws)
        t_idx = torch.tensor([t for _, t in chunk]).repeat_interleave(draws)
        noisy = noisy_latents(latents[q_idx], noise, t_idx, alphas)
        pred = unet(noisy.to(device), t_idx.to(device), **unet_kwargs(cond[q_idx].to(device), unet.dtype)).sample
        target = training_target(target_kind, latents[q_idx], noise, t_idx, alphas)
        per_row = ((pred.float().cpu() - target) ** 2).mean(dim=(1, 2, 3)).view(len(chunk), draws).mean(1)
        for (q, t), value in zip(chunk, per_row.tolist()):
            losses[q, timesteps.index(t)] = value
    return losses.mean(axis=1)


def _output_noise(seed: int, key: str, t: int, draws: int, shape) -> torch.Tensor:
    return torch.randn((draws, *shape), generator=generator(f"das-sd-lds:{seed}:{key}:{t}", drop_low_bit=True))


def cached_outputs(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Outputs of one retrained LoRA, computed once and kept as JSON beside it (resumable runs).

    Args:
        path: The JSON cache file; read when it exists, else written.
        compute: Computes the outputs when the file is not there yet.

    Returns:
        The (Q,) outputs, from the file or from ``compute``.
    """
    if path.is_file():
        return np.array(json.loads(path.read_text())["outputs"])
    values = compute()
    atomic_write_json(path, {"outputs": [float(v) for v in values]})
    return values


def retrained_outputs(base: Path, folders: list[list[Path]], queries: LDSQueries, settings: LDSSettings,
                      progress: bool = True) -> np.ndarray:
    """Model outputs of every retrained LoRA on one query set (cached beside each LoRA).

    The base pipeline is loaded on the CPU only when some output is not cached yet; the prompts are
    encoded with each retrained LoRA loaded, so that its text-encoder part (trained by default)
    enters the outputs as it enters the generations (docs/method.md §15).

    Args:
        base: Folder of the base model.
        folders: LoRA folders ``[subset][repeat]`` (``retrain_subsets``).
        queries: The query set.
        settings: Gives the output grid, noise draws and seed (``model_outputs``).
        progress: Show a progress bar.

    Returns:
        (M, Q) per subset, the mean over its repeats of each query's averaged L_simple.
    """
    from tqdm.auto import tqdm

    from ..latents import encode_prompts
    from ..models.loading import load_lora, load_pipeline

    pipe = None
    rows = []
    for row in tqdm(folders, desc=f"outputs ({queries.name})", unit="subset", disable=not progress):
        values = []
        for folder in row:
            def compute(folder=folder):
                nonlocal pipe
                if pipe is None:  # loaded only when some output is not cached yet
                    pipe = load_pipeline(base, device="cpu")
                load_lora(pipe, folder, adapter_name="lds")
                try:
                    cond = encode_prompts(pipe, queries.prompts)  # through the LoRA's text-encoder part
                    return model_outputs(pipe, queries.latents, cond, queries.keys, settings)
                finally:
                    pipe.delete_adapters("lds")
            values.append(cached_outputs(Path(folder) / f"outputs-{queries.name}-{_query_digest(queries, settings)}.json",
                                         compute))
        rows.append(np.mean(values, axis=0))
    return np.stack(rows)


def _query_digest(queries: LDSQueries, settings: LDSSettings) -> str:
    # "lora-text": outputs cached before prompts went through the LoRA's text encoder are not reused
    text = json.dumps([queries.keys, queries.prompts, settings.output_timesteps, settings.output_noise_draws,
                       settings.output_seed, "lora-text"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]
