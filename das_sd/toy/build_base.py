"""`das-sd build-base`: the reproducible recipe that trains the embedded tiny SD (or tiny SDXL) from
scratch on CPU.

Two stages, as for Stable Diffusion itself:
1. the VAE on a generic mix of plain shapes, patterned fills, patterned backgrounds and overlaid
   marks (a VAE trained on plain shapes cannot express textures, so a LoRA style could not show);
2. the UNet and the text encoder(s) jointly on captioned plain shapes only, with a fraction of the
   (shape, colour, background) combinations held out to test that prompts compose.
The data of both stages is drawn by ``base_data``.

The tiny SDXL (``family="sdxl"``) skips stage 1: SDXL's VAE has SD's layout, so it takes the
embedded tiny SD's trained VAE (scaling factor included) and tokenizer, and trains only stage 2 with
SDXL's conditioning (both encoders' states, the pooled embedding and the size ``time_ids``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..conditioning import Conditioning, text_states, unet_kwargs
from ..noising import noisy_latents
from ..seeds import generator
from . import tiny_sd, tiny_sdxl
from .base_data import (caption_of, held_out_combinations, shapes_dataset, to_tensor, training_combinations,
                        vae_batch)
from .tokenizer import build_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class BaseRecipe:
    """The hyperparameters of ``build_base``; the defaults are the embedded model's recipe.

    Attributes:
        seed: Seed of every random draw (data, initialisation, noise).
        vae_steps: VAE training steps.
        vae_batch_size: Images per VAE step.
        vae_lr: Peak VAE learning rate (AdamW, warmup then cosine decay to 5 %).
        unet_images: Captioned shape images the UNet and text encoder train on.
        unet_steps: UNet + text encoder training steps.
        unet_batch_size: Images per UNet step.
        unet_lr: Peak UNet + text encoder learning rate.
        warmup_steps: Linear warmup steps of both stages.
        final_lr_fraction: The UNet stage's final learning rate, as a fraction of ``unet_lr``.
        caption_dropout: Fraction of captions replaced by the empty prompt (for classifier-free guidance).
        held_out_every: Every n-th (shape, fg, bg) combination is never trained on.
        tokenizer_merges: BPE merges learned for the tokenizer.
        eval_steps: Sampling steps of the held-out accuracy check.
        eval_guidance: Guidance scale of that check.
        eval_seeds: Seeds of that check, one image per held-out combination and seed.
    """

    seed: int = 0
    vae_steps: int = 2000
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    unet_images: int = 20000
    unet_steps: int = 5500
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    caption_dropout: float = 0.1
    held_out_every: int = 10  # every 10th (shape, fg, bg) combination is never trained on
    tokenizer_merges: int = 400
    eval_steps: int = 25
    eval_guidance: float = 4.0
    eval_seeds: list[int] = field(default_factory=lambda: [0, 1])


# One recipe for both families: the tiny SDXL differs in architecture only (it reuses the tiny SD's VAE
# and tokenizer, so its VAE stage is skipped). 3200 steps of 32 had left it at held-out accuracy 0.21;
# 5500 of 64 reach 1.00 (das_sd/assets/tiny-sdxl/das_sd_build.json).
FAMILY_RECIPES: dict[str, dict] = {"sd": {}, "sdxl": {}}


def base_recipe(family: str = "sd", **overrides: object) -> BaseRecipe:
    """The embedded model's recipe of a family, with overrides.

    Args:
        family: "sd" or "sdxl".
        **overrides: ``BaseRecipe`` fields to change.

    Returns:
        The recipe.

    Raises:
        ValueError: When ``family`` is neither "sd" nor "sdxl".
    """
    if family not in FAMILY_RECIPES:
        raise ValueError(f"build-base: family must be one of {', '.join(FAMILY_RECIPES)}, not {family!r}")
    return BaseRecipe(**{**FAMILY_RECIPES[family], **overrides})


def lr_at(step: int, total: int, peak: float, warmup: int, final_fraction: float) -> float:
    """The learning rate at a step: linear warmup, then cosine decay to ``final_fraction * peak``.

    Args:
        step: The step (0-based).
        total: Total steps.
        peak: Learning rate at the end of the warmup.
        warmup: Warmup steps.
        final_fraction: Learning rate at the last step, as a fraction of ``peak``.

    Returns:
        The learning rate.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# stages

def train_vae(recipe: BaseRecipe, log: dict) -> torch.nn.Module:
    """Stage 1: train the VAE from scratch on the generic mix (``vae_batch``).

    Args:
        recipe: The hyperparameters.
        log: Build record; gets "vae": final loss EMA and reconstruction PSNR (dB) on 256 images.

    Returns:
        The trained ``AutoencoderKL``, in eval mode.
    """
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng([recipe.seed, 1])
    vae = tiny_sd.new_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    ema = None
    bar = tqdm(range(recipe.vae_steps), desc="VAE", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.vae_steps, recipe.vae_lr, recipe.warmup_steps, 0.05)
        x = vae_batch(rng, recipe.vae_batch_size)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    vae.eval()
    with torch.no_grad():
        x = vae_batch(np.random.default_rng([recipe.seed, 2]), 256)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    log["vae"] = {"final_loss_ema": ema, "psnr_db_generic_mix": 10 * math.log10(1.0 / mse)}
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of each image (unscaled: before the latent scaling factor).

    Args:
        vae: The trained VAE.
        images: (n, h, w, 3) uint8 images.
        batch_size: Images encoded at once.

    Returns:
        The posterior means and standard deviations, each (n, 4, h / 4, w / 4) float32.
    """
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(to_tensor(images[i:i + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet_and_text_encoder(recipe: BaseRecipe, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
                                log: dict, family: str = "sd") -> tuple[UNet2DConditionModel, list[CLIPTextModel]]:
    """Stage 2: train the UNet and text encoder(s) jointly (epsilon prediction) on captioned plain shapes.

    SD: sets the VAE's ``scaling_factor`` to 1 / std of the training latents first. SDXL: keeps the
    VAE's (the tiny SD's) and conditions as SDXL does (``conditioning.text_states`` of both encoders,
    size ``time_ids`` ``tiny_sdxl.TIME_IDS``: the images are drawn at the training size, uncropped).

    Args:
        recipe: The hyperparameters.
        vae: The trained VAE; for SD its config gets the scaling factor.
        tokenizer: The embedded tokenizer (of every encoder).
        log: Build record; gets "scaling_factor" and "unet": final loss EMA.
        family: "sd" or "sdxl".

    Returns:
        The trained UNet and text encoders (one for SD, two for SDXL), in eval mode.
    """
    rng = np.random.default_rng([recipe.seed, 3])
    images, captions = shapes_dataset(rng, recipe.unet_images, training_combinations(recipe.held_out_every))
    means, stds = encode_latents(vae, images)
    if family == "sdxl":
        scaling = float(vae.config.scaling_factor)
    else:
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
    log["scaling_factor"] = scaling

    torch.manual_seed(recipe.seed)
    if family == "sdxl":
        unet = tiny_sdxl.new_unet().train()
        encoders = [e.train() for e in tiny_sdxl.new_text_encoders(tokenizer)]
        time_ids = torch.tensor(tiny_sdxl.TIME_IDS, dtype=torch.float32)
    else:
        unet = tiny_sd.new_unet().train()
        encoders = [tiny_sd.new_text_encoder(tokenizer).train()]
    tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    noise_scheduler = tiny_sd.new_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    params = list(unet.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    gen = generator(recipe.seed)
    ema = None
    bar = tqdm(range(recipe.unet_steps), desc="UNet+text encoder", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe.unet_steps, recipe.unet_lr, recipe.warmup_steps,
                                recipe.final_lr_fraction)
        idx = torch.randint(len(means), (recipe.unet_batch_size,), generator=gen)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        ids = tokens[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < recipe.caption_dropout
        ids[drop] = empty
        t = torch.randint(0, len(alphas), (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = noisy_latents(x0, eps, t, alphas)
        states = text_states(encoders, [ids] * len(encoders), family)
        cond = Conditioning(*states, time_ids.expand(len(idx), 6)) if family == "sdxl" else states
        loss = F.mse_loss(unet(xt, t, **unet_kwargs(cond, xt.dtype)).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.99 * ema + 0.01 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    log["unet"] = {"final_loss_ema": ema}
    return unet.eval(), [e.eval() for e in encoders]


def _embedded_vae_and_tokenizer(log: dict) -> tuple[AutoencoderKL, CLIPTokenizer]:
    """The embedded tiny SD's trained VAE and tokenizer (the tiny SDXL's), noted in the build record."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from ..models.fingerprint import model_fingerprint
    from ..models.loading import embedded_base_path

    base = embedded_base_path()
    log["vae_and_tokenizer_from"] = {"model": "embedded tiny-sd", "fingerprint": model_fingerprint(base)}
    vae = AutoencoderKL.from_pretrained(base / "vae", local_files_only=True)
    return vae, CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)


def build_base(out: Path, recipe: BaseRecipe | None = None, family: str = "sd") -> dict:
    """Train the embedded model from scratch and save it as a diffusers folder at ``out``.

    The folder is written beside ``out`` first and replaces it (an existing ``out`` is deleted) only
    when complete; it also holds ``das_sd_build.json``, the build record.

    Args:
        out: The model folder to write.
        recipe: The hyperparameters; None: the family's (``base_recipe``).
        family: "sd": the tiny SD; "sdxl": the tiny SDXL, on the embedded tiny SD's VAE and tokenizer.

    Returns:
        The build record: the family, the recipe, stage losses, scaling factor, timings and the held-out
        combinations with the model's text-to-image accuracy on them.

    Raises:
        ValueError: When ``family`` is neither "sd" nor "sdxl".
    """
    from .quality import text_to_image_accuracy

    if family not in ("sd", "sdxl"):
        raise ValueError(f"build_base: family must be 'sd' or 'sdxl', not {family!r}")
    recipe = recipe or base_recipe(family)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log: dict = {"family": family, "recipe": asdict(recipe)}
    start = time.time()
    if family == "sdxl":
        vae, tokenizer = _embedded_vae_and_tokenizer(log)
    else:
        combos = training_combinations(recipe.held_out_every)
        corpus = [caption_of(*c) for c in combos]
        tokenizer = build_clip_tokenizer(corpus, tiny_sd.MAX_TOKENS, num_merges=recipe.tokenizer_merges)
        vae = train_vae(recipe, log)
        log["vae_seconds"] = time.time() - start
    unet, encoders = train_unet_and_text_encoder(recipe, vae.eval(), tokenizer, log, family)
    log["total_train_seconds"] = time.time() - start
    if family == "sdxl":
        pipe = tiny_sdxl.assemble_pipeline(vae, tuple(encoders), tokenizer, unet)
    else:
        pipe = tiny_sd.assemble_pipeline(vae, encoders[0], tokenizer, unet)
    log["held_out_accuracy"] = text_to_image_accuracy(
        pipe, held_out_combinations(recipe.held_out_every), seeds=recipe.eval_seeds,
        steps=recipe.eval_steps, guidance=recipe.eval_guidance)
    log["held_out_combinations"] = [list(c) for c in held_out_combinations(recipe.held_out_every)]

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        if (tmp / name).is_dir():
            tiny_sd.write_portable_text_encoder(tmp / name)
    (tmp / "das_sd_build.json").write_text(json.dumps(log, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return log
