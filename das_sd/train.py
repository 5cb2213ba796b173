"""`das-sd train-lora`: the LoRA fine-tuning recipe, exactly reproducible for a given seed.

Attribution benchmarks retrain the LoRA on many subsets of the data, so the recipe is a dataclass
recorded next to the weights (``lora_record``), and every random draw (batch order, timesteps,
noise) comes from one generator seeded by ``recipe.seed``. Latents (VAE mode x scaling factor, as the featurizer uses) are
computed once and the VAE stays frozen. The text encoder gets its own LoRA (``text_encoder_rank``,
on a copy, so the pipeline passed in stays the base); with ``text_encoder_rank=0`` it stays frozen
and the caption embeddings are computed once too.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .data.datasets import Dataset
from .featurize.lora_layers import lora_parameters
from .io import atomic_write_json
from .conditioning import Conditioning, model_family, size_time_ids, text_states, unet_kwargs
from .latents import encode_images, encode_prompts, native_resolution, text_encoders, tokenize_prompts
from .lora_record import LORA_WEIGHT_NAME, RECORD_NAME, LoraRecipe
from .models.fingerprint import lora_fingerprint, model_fingerprint
from .models.loading import resolve_base
from .models.modes import restored_modes
from .noising import noisy_latents, prediction_type, training_target
from .seeds import generator, seeded_global_rng

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


def batch_schedule(repeats: list[int], batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Sample indices for every step: shuffled epochs over the samples, each repeated ``repeats`` times.

    Args:
        repeats: How many times each sample appears in one epoch (kohya folder repeats; 1 usually).
        batch_size: Samples per step.
        steps: Number of steps.
        generator: Draws each epoch's permutation.

    Returns:
        ``steps`` int64 tensors of ``batch_size`` sample indices each.
    """
    pool = torch.tensor([i for i, r in enumerate(repeats) for _ in range(r)])
    order: list[torch.Tensor] = []
    needed = steps * batch_size
    while sum(len(o) for o in order) < needed:
        order.append(pool[torch.randperm(len(pool), generator=generator)])
    flat = torch.cat(order)[:needed]
    return list(flat.view(steps, batch_size))


def add_lora_adapter(unet: UNet2DConditionModel, recipe: LoraRecipe) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and add a trainable LoRA (peft adapter ``"default"``) to its target modules.

    The LoRA init (gaussian A, zero B) draws from torch's global generator: seed it first.

    Args:
        unet: The base UNet, without adapters; changed in place.
        recipe: Its ``rank``, ``alpha`` and ``target_modules`` are used.

    Returns:
        The LoRA parameters, trainable, in parameter order.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, init_lora_weights="gaussian",
                                target_modules=list(recipe.target_modules)))
    return _trainable_lora_parameters(unet)


def add_text_encoder_adapter(text_encoder: CLIPTextModel, recipe: LoraRecipe) -> list[torch.nn.Parameter]:
    """Inject a trainable LoRA into ``text_encoder`` (a copy: the pipeline's own stays untouched).

    Args:
        text_encoder: The text encoder to change in place (pass a copy); it is frozen first.
        recipe: Its ``text_encoder_rank`` is the rank and the alpha of the LoRA on
            ``TEXT_ENCODER_TARGET_MODULES``.

    Returns:
        The LoRA parameters, trainable, in parameter order.
    """
    from peft import LoraConfig, inject_adapter_in_model

    text_encoder.requires_grad_(False)
    # peft directly: transformers' add_adapter wants a newer peft than diffusers needs
    inject_adapter_in_model(LoraConfig(r=recipe.text_encoder_rank, lora_alpha=float(recipe.text_encoder_rank),
                                       init_lora_weights="gaussian",
                                       target_modules=list(TEXT_ENCODER_TARGET_MODULES)),
                            text_encoder, adapter_name="default")
    return _trainable_lora_parameters(text_encoder)


def _trainable_lora_parameters(model) -> list[torch.nn.Parameter]:
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def train_lora(base: str | Path | None, dataset: Dataset, out: str | Path, recipe: LoraRecipe | None = None,
               pipe: StableDiffusionPipeline | None = None, progress: bool = True, keep_adapter: bool = False) -> dict:
    """Fine-tune a LoRA on ``dataset`` and save it (diffusers format) with its JSON record in ``out``.

    Args:
        base: The base model folder; None: the embedded tiny SD.
        dataset: The training samples (images, captions, repeats).
        out: The folder for ``LORA_WEIGHT_NAME`` and ``RECORD_NAME`` (created if missing).
        recipe: How to train; None: ``LoraRecipe()``.
        pipe: A loaded base pipeline (without any LoRA) to avoid reloading it. It is left
            unchanged, unless ``keep_adapter``.
        progress: Show a progress bar over the steps.
        keep_adapter: Leave the trained adapter active on ``pipe.unet`` as "default" (and the trained
            text encoder as ``pipe.text_encoder``): the in-memory trained model, e.g. to compare with
            the saved file.

    Returns:
        The record written to ``RECORD_NAME``: the recipe (resolution filled in), base and LoRA
        fingerprints, the dataset's root, fingerprint and sample keys, the training time and the
        loss curve (``[step, EMA loss]`` every 50 steps and at the last).

    Raises:
        ValueError: If ``pipe`` already has LoRA adapters loaded.
    """
    from diffusers import DDPMScheduler

    from .models.loading import load_pipeline

    recipe = recipe or LoraRecipe()
    base_path = resolve_base(base)
    pipe = pipe or load_pipeline(base_path)
    resolution = recipe.resolution or native_resolution(pipe)
    start = time.time()

    latents = encode_images(pipe, dataset, resolution)
    captions = [s.caption for s in dataset]
    # SDXL's size conditioning of each image as featurizing computes it (das_sd.conditioning)
    time_ids = size_time_ids([dataset.load_image(s).size for s in dataset], (resolution, resolution)) \
        if model_family(pipe) == "sdxl" else None
    train_text_encoder = recipe.text_encoder_rank > 0
    if train_text_encoder:  # the conditioning changes every step: encode the tokens in the loop
        conditioning = TokenConditioning(tokenize_prompts(pipe, captions), time_ids)
    else:
        conditioning = encode_prompts(pipe, captions, time_ids=time_ids)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod.to(latents.device)

    unet, encoders = pipe.unet, text_encoders(pipe)
    if getattr(unet, "peft_config", None) or any(lora_parameters(e, required=False) for e in encoders):
        raise ValueError("train_lora needs a base pipeline without LoRA adapters loaded")
    out = Path(out).expanduser().resolve()
    # peft draws the LoRA A init from torch's global generator: seeded for the call only, and the
    # caller's generator state and module modes are theirs again after it
    with seeded_global_rng(recipe.seed), restored_modes(unet, *encoders):
        losses = _fit(pipe, dataset, recipe, latents, conditioning, alphas, out, progress, keep_adapter)

    record = {
        "das_sd_version": __version__,
        "recipe": asdict(recipe) | {"resolution": resolution},
        "base": str(base_path),
        "base_fingerprint": model_fingerprint(base_path),
        "dataset_root": str(dataset.root),
        "dataset_fingerprint": dataset.fingerprint(),
        "sample_keys": dataset.keys,
        "lora_fingerprint": lora_fingerprint(out / LORA_WEIGHT_NAME),
        "train_seconds": round(time.time() - start, 2),
        "loss_ema": losses,
    }
    atomic_write_json(out / RECORD_NAME, record)
    return record


@dataclass
class TokenConditioning:
    """The captions' token ids (one tensor per text encoder) and SDXL size conditioning, encoded
    every step while a text-encoder LoRA trains.

    Attributes:
        tokens: One (N, L) id tensor per text encoder.
        time_ids: (N, 6) SDXL size conditioning; None for SD.
    """
    tokens: list[torch.Tensor]
    time_ids: torch.Tensor | None = None

    def encode(self, encoders: list, idx: list[int]) -> torch.Tensor | Conditioning:
        """The conditioning of rows ``idx`` through ``encoders`` (with gradients).

        Args:
            encoders: The text encoders (with their LoRAs), in ``latents.text_encoders`` order.
            idx: Row positions.

        Returns:
            SD text states, or an SDXL ``Conditioning``.
        """
        states = text_states(encoders, [t[idx] for t in self.tokens], "sd" if self.time_ids is None else "sdxl")
        if self.time_ids is None:
            return states
        return Conditioning(states[0], states[1], self.time_ids[idx].to(states[0].device))


def _fit(pipe, dataset: Dataset, recipe: LoraRecipe, latents: torch.Tensor,
         conditioning: torch.Tensor | Conditioning | TokenConditioning, alphas: torch.Tensor, out: Path,
         progress: bool, keep_adapter: bool) -> list[list]:
    """Add the adapters, train them and save them in ``out``; the loss curve. ``conditioning``: the
    captions' token ids when the text encoders train too (encoded every step), else their encoded
    conditioning. The loss compares the UNet's output with the scheduler's training target
    (docs/method.md §2)."""
    unet, encoders = pipe.unet, text_encoders(pipe)
    train_text_encoder = recipe.text_encoder_rank > 0
    target_kind = prediction_type(pipe)  # before any adapter: an unsupported model is refused untouched
    params = add_lora_adapter(unet, recipe)
    groups = [{"params": params, "lr": recipe.learning_rate}]
    if train_text_encoder:
        encoders = [copy.deepcopy(e) for e in encoders]
        for encoder in encoders:
            text_params = add_text_encoder_adapter(encoder, recipe)
            params = params + text_params
            groups.append({"params": text_params, "lr": recipe.text_encoder_learning_rate or recipe.learning_rate})
            encoder.train()
    unet.train()
    rng = generator(recipe.seed)
    schedule = batch_schedule([s.repeats for s in dataset], recipe.batch_size, recipe.steps, rng)
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    losses, ema = [], None
    bar = tqdm(schedule, desc="train-lora", unit="step", disable=not progress)
    try:
        for step, idx in enumerate(bar):
            x0 = latents[idx]
            t = torch.randint(0, len(alphas), (len(idx),), generator=rng)
            eps = torch.randn(x0.shape, generator=rng).to(x0.device)  # drawn on the CPU: the same on any device
            xt = noisy_latents(x0, eps, t, alphas)
            cond = conditioning.encode(encoders, idx) if train_text_encoder else conditioning[idx]
            pred = unet(xt.to(unet.dtype), t.to(unet.device), **unet_kwargs(cond, unet.dtype)).sample
            target = training_target(target_kind, x0, eps, t, alphas)
            loss = F.mse_loss(pred.float(), target.to(pred.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            opt.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if step % 50 == 0 or step == recipe.steps - 1:
                losses.append([step, round(ema, 6)])
            bar.set_postfix(loss=f"{ema:.4f}")
        unet.eval()
        for encoder in encoders:
            encoder.eval()
        out.mkdir(parents=True, exist_ok=True)
        _save_lora(pipe, out, encoders if train_text_encoder else [])
    except BaseException:
        keep_adapter = False
        raise
    finally:
        if not keep_adapter and getattr(unet, "peft_config", None):
            unet.delete_adapters("default")
        unet.eval().requires_grad_(False)
        if keep_adapter and train_text_encoder:
            for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
                setattr(pipe, name, encoder.eval().requires_grad_(False))

    return losses


def _save_lora(pipe, out: Path, encoders: list) -> None:
    """Write the UNet's LoRA and the text encoders' (``encoders``, empty when frozen) in diffusers'
    format, with each part's adapter config as metadata."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from .models.lora_files import portable_adapter_config

    unet = pipe.unet
    parts = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
             "unet_lora_adapter_metadata": portable_adapter_config(unet.peft_config["default"])}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), encoders):
        # "text_model." as every SD LoRA file spells it (transformers 5 dropped the submodule;
        # diffusers strips the prefix again when loading)
        parts[f"{name}_lora_layers"] = {k if k.startswith("text_model.") else f"text_model.{k}": v
                                        for k, v in convert_state_dict_to_diffusers(
                                            get_peft_model_state_dict(encoder, adapter_name="default")).items()}
        parts[f"{name}_lora_adapter_metadata"] = portable_adapter_config(encoder.peft_config["default"])
    saver = StableDiffusionXLPipeline if model_family(pipe) == "sdxl" else StableDiffusionPipeline
    saver.save_lora_weights(str(out), weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **parts)


def read_subset_file(path: str | Path) -> list[str]:
    """Sample keys from a JSON list or a text file with one key per line.

    Args:
        path: The file; in the text form, blank lines and lines starting with ``#`` are skipped.

    Returns:
        The keys, in file order.

    Raises:
        ValueError: If the file holds JSON other than a list of strings, or no key.
    """
    path = Path(path)
    text = path.read_text()
    try:
        keys = json.loads(text)
    except json.JSONDecodeError:
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{path}: expected a JSON list of sample keys or one key per line")
    if not keys:
        raise ValueError(f"{path}: the subset is empty")
    return keys


def train_lora_on_folder(data: str | Path, out: str | Path, recipe: LoraRecipe | None = None,
                         base: str | Path | None = None, subset: str | Path | None = None,
                         dataset_options: dict | None = None, notify: Callable[[str], None] | None = None) -> dict:
    """Read a dataset folder and fine-tune a LoRA on it (``das-sd train-lora``).

    Args:
        data: dataset folder (imagefolder with metadata.jsonl, or kohya ``N_name`` folders).
        out: output folder (pytorch_lora_weights.safetensors and lora_record.json).
        recipe: rank, steps, learning rates, seed ... (None: ``LoraRecipe()``).
        base: diffusers SD 1.x / 2.x or SDXL folder (None: the embedded tiny SD).
        subset: file with the sample keys to train on (JSON list or one per line); None: all.
        dataset_options: ``open_dataset`` keywords (format, caption column, caption extension, skip_bad).
        notify: called with notes for the user (the samples a ``skip_bad`` read left out).

    Returns:
        The training record, as ``train_lora`` returns it.
    """
    from .data.datasets import open_dataset, skipped_note

    dataset = open_dataset(data, **(dataset_options or {}))
    note = skipped_note(dataset)
    if note and notify:
        notify(note)
    if subset is not None:
        dataset = dataset.subset(read_subset_file(subset))
    return train_lora(base, dataset, out, recipe)
