"""The layers of a LoRA file, each with its own rank and scale, in the three key styles
(see ``lora_files``).

A layer's update is ``scale * up @ down`` (a conv layer: ``up``, a 1x1 conv, after ``down``), and das-sd
keeps each layer's scale the way kohya writes it, ``alpha / rank`` with the layer's own rank: kohya's
``alpha`` tensor (absent or 0: alpha = rank, as sd-scripts reads it); for peft and diffusers configs,
``lora_alpha / r`` with ``alpha_pattern`` / ``rank_pattern`` per layer, or ``lora_alpha / sqrt(r)`` under
``use_rslora`` (the layer's alpha is then scale * rank); without a config, scale 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ModelError
from .lora_files import DOWN_SUFFIXES, KOHYA_HALVES, KOHYA_MODELS, UP_SUFFIXES

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


@dataclass(frozen=True)
class LoraLayerWeights:
    """One LoRA layer of a file; its update is ``alpha / rank * up @ down``.

    Attributes:
        down: ``lora_down`` / ``lora_A``: (rank, in) or, for a conv, (rank, in, kh, kw).
        up: ``lora_up`` / ``lora_B``: (out, rank) or (out, rank, 1, 1).
        alpha: kohya's alpha: the layer's scale times its rank.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        """The layer's own rank (the rows of ``down``)."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor of ``up @ down`` in the layer's update."""
        return self.alpha / self.rank


def config_alpha(config: Mapping | None, module: str, rank: int) -> float:
    """kohya's alpha (scale * rank) of one layer of a peft ``LoraConfig``, matched the way peft matches
    ``rank_pattern`` / ``alpha_pattern`` (peft's own defaults for entries the config leaves out).

    Args:
        config: The config's entries (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
            ``use_rslora``); None or empty: scale 1.
        module: The layer's module path (a text-encoder layer's with or without ``text_model.``).
        rank: The layer's rank in the file.

    Returns:
        The alpha that gives the layer the scale peft gives it.
    """
    if not config:
        return float(rank)
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    cfg = LoraConfig(**{k: config[k] for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")
                        if config.get(k) is not None})
    names = [module, module.removeprefix("text_model.")]

    def pick(patterns: dict, default: float) -> float:
        for name in names:
            key = get_pattern_key(list(patterns), name)
            if key in patterns:
                return patterns[key]
        return default

    r, alpha = pick(cfg.rank_pattern or {}, cfg.r), pick(cfg.alpha_pattern or {}, cfg.lora_alpha)
    if cfg.use_rslora:
        return alpha / math.sqrt(r) * rank
    return float(alpha) if r == rank else alpha / r * rank


def split_lora_key(key: str) -> tuple[str, str, str]:
    """(model, module path, "down" | "up") of a diffusers-style LoRA key.

    Args:
        key: A ``unet.*`` / ``text_encoder.*`` key; a text-encoder module path gets ``text_model.``
            if it lacks it (transformers 5 layout -> the usual one).

    Returns:
        The model ("unet", "text_encoder" or "text_encoder_2"), the module path and the half.

    Raises:
        ModelError: When the key is not a diffusers LoRA weight key.
    """
    model = next((m for m in ("unet", "text_encoder", "text_encoder_2") if key.startswith(m + ".")), None)
    if model is None:
        raise ModelError(f"LoRA key {key!r} is neither a UNet ('unet.') nor a text-encoder ('text_encoder.') key")
    for kind, suffixes in (("down", DOWN_SUFFIXES), ("up", UP_SUFFIXES)):
        for suffix in suffixes:
            if key.endswith(suffix):
                module = key[len(model) + 1:-len(suffix)]
                if model != "unet" and not module.startswith("text_model."):
                    module = "text_model." + module
                return model, module, kind
    raise ModelError(f"unrecognised LoRA key {key!r}")


def _pairs(halves: dict[tuple[str, str], dict[str, torch.Tensor]]) -> dict[tuple[str, str], tuple]:
    for layer, pair in halves.items():
        if set(pair) != {"down", "up"}:
            raise ModelError(f"LoRA layer {'.'.join(layer)!r} has a {next(iter(pair))} weight without the other half")
    return {layer: (pair["down"], pair["up"]) for layer, pair in halves.items()}


def diffusers_layers(state: Mapping[str, torch.Tensor], metadata: Mapping | None = None
                     ) -> dict[tuple[str, str], LoraLayerWeights]:
    """Every layer of a diffusers-style LoRA state dict with its alpha from the file's adapter metadata.

    Args:
        state: ``unet.*`` / ``text_encoder.*`` LoRA weights.
        metadata: ``adapter_metadata`` of the file ("unet.r", "unet.lora_alpha", ...); None: scale 1.

    Returns:
        (model, module path) -> the layer.

    Raises:
        ModelError: When a key is not a LoRA weight key or a layer lacks one of its halves.
    """
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        model, module, kind = split_lora_key(key)
        halves.setdefault((model, module), {})[kind] = value
    configs = {model: {k[len(model) + 1:]: v for k, v in (metadata or {}).items() if k.startswith(model + ".")}
               for model, _ in halves}
    return {(model, module): LoraLayerWeights(down, up, config_alpha(configs[model], module, down.shape[0]))
            for (model, module), (down, up) in _pairs(halves).items()}


def peft_layers(state: Mapping[str, torch.Tensor], config: Mapping | None) -> dict[tuple[str, str], LoraLayerWeights]:
    """Every layer of a peft UNet adapter file with its alpha from ``adapter_config.json``.

    Args:
        state: ``base_model.model.*.lora_A/lora_B.weight`` keys.
        config: The adapter's config; None: scale 1.

    Returns:
        ("unet", module path) -> the layer.

    Raises:
        ModelError: When a key is not a peft LoRA weight key or a layer lacks one of its halves.
    """
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        kind = "down" if key.endswith(".lora_A.weight") else "up" if key.endswith(".lora_B.weight") else None
        if kind is None or not key.startswith("base_model.model."):
            raise ModelError(f"unrecognised peft LoRA key {key!r}")
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        halves.setdefault(("unet", module), {})[kind] = value
    return {layer: LoraLayerWeights(down, up, config_alpha(config, layer[1], down.shape[0]))
            for layer, (down, up) in _pairs(halves).items()}


def kohya_layers(state: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], LoraLayerWeights]:
    """Every layer of a kohya LoRA state dict, under its kohya name (module path with "_" for ".").

    Args:
        state: ``lora_unet_*`` / ``lora_te_*`` keys.

    Returns:
        (model, kohya layer name without its ``lora_unet_`` / ``lora_te_`` prefix) -> the layer.

    Raises:
        ModelError: When a key is not a kohya LoRA key, a layer lacks one of its halves, or has an
            alpha without weights.
    """
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        prefix = next((p for p in KOHYA_MODELS if name.startswith(p)), None)
        if prefix is None:
            raise ModelError(f"unrecognised kohya LoRA key {key!r}")
        layer = (KOHYA_MODELS[prefix], name[len(prefix):])
        if part == "alpha":
            alphas[layer] = float(value)
        elif part in KOHYA_HALVES:
            halves.setdefault(layer, {})[KOHYA_HALVES[part]] = value
        else:
            raise ModelError(f"unrecognised kohya LoRA key {key!r}")
    if set(alphas) - set(halves):
        raise ModelError(f"kohya layer {'.'.join(sorted(set(alphas) - set(halves))[0])!r} has an alpha but no weights")
    # sd-scripts (and A1111) read a missing or zero alpha as alpha = rank: scale 1
    return {layer: LoraLayerWeights(down, up, alphas.get(layer) or float(down.shape[0]))
            for layer, (down, up) in _pairs(halves).items()}


def resolve_kohya_names(layers: Mapping[tuple[str, str], LoraLayerWeights], modules: Mapping[str, Iterable[str]],
                        aliases: Mapping[str, Mapping[str, str]] | None = None
                        ) -> dict[tuple[str, str], LoraLayerWeights]:
    """kohya layer names -> the module paths of the models they belong to.

    kohya names a layer by its module path with "_" for "." (``lora_unet_down_blocks_0_attentions_0_proj_in``;
    sd-scripts' SDXL files by the original UNet's paths, ``lora_unet_input_blocks_4_1_...``, given as
    ``aliases``); the names are matched exactly, so no layer lands on a guessed module.

    Args:
        layers: ``kohya_layers`` of a file.
        modules: Model ("unet", "text_encoder") -> its module paths; text-encoder layers are keyed
            ``text_model.*`` whatever the transformers layout.
        aliases: Model -> {another path of a module (``sgm_names.sgm_aliases``): its module path}.

    Returns:
        (model, module path) -> the layer.

    Raises:
        ModelError: Naming a few layers that match no module (or several) of the models, or two
            layers of the file that name the same module.
    """
    lookup: dict[tuple[str, str], str | None] = {}

    def add(model: str, spelling: str, canonical: str) -> None:
        key = (model, spelling.replace(".", "_"))
        lookup[key] = canonical if lookup.get(key, canonical) == canonical else None  # None: ambiguous

    for model, names in modules.items():
        for name in names:
            canonical = name if model == "unet" or name.startswith("text_model.") else f"text_model.{name}"
            for spelling in {name, canonical}:
                add(model, spelling, canonical)
    for model, table in (aliases or {}).items():
        for alias, name in table.items():
            add(model, alias, name)
    resolved, unknown, names = {}, [], {}
    for (model, name), layer in layers.items():
        module = lookup.get((model, name))
        kohya_name = next(p for p, m in KOHYA_MODELS.items() if m == model) + name
        if module is None:
            unknown.append(kohya_name)
        elif (model, module) in resolved:
            raise ModelError(f"kohya layers {names[(model, module)]} and {kohya_name} both name the {model}'s "
                             f"layer {module!r}")
        else:
            resolved[(model, module)], names[(model, module)] = layer, kohya_name
    if unknown:
        raise ModelError(f"{len(unknown)} of its {len(layers)} kohya layers name no layer of this pipeline "
                         f"(e.g. {', '.join(unknown[:3])}): the LoRA was made for another model layout")
    return resolved
