"""Load a Stable Diffusion 1.x / 2.x or SDXL pipeline folder (offline) and LoRA files in the formats people share.

LoRA formats (read and refused in ``lora_files``, their layers read in ``lora_weights``):
- diffusers: ``pytorch_lora_weights.safetensors`` with ``unet.*.lora_A/lora_B`` (or the older
  ``lora.down/lora.up``) keys, as written by ``save_lora_weights`` and diffusers' training scripts;
  diffusers' own ``load_lora_weights`` loads them with the adapter config the file records;
- peft: ``adapter_model.safetensors`` (+ ``adapter_config.json``) with ``base_model.model.*`` keys;
- kohya / A1111: ``lora_unet_*.lora_down/lora_up/alpha`` keys, as written by sd-scripts (SDXL files name
  UNet layers by the original SGM paths, ``lora_unet_input_blocks_*``: see ``sgm_names``).
Kohya and peft files are converted here, each layer keeping its own rank and its alpha / rank scale, and
loaded with a peft config that names every layer. After loading, the LoRA weights peft holds are counted
against the file's: a LoRA that loads only part of its file is refused. Only safetensors are read:
pickled checkpoints (.bin, .pt, .ckpt) are refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from ..conditioning import model_family
from .errors import ModelError
from .runtime import default_device, quiet_libraries  # noqa: F401  (importable from here as before)
# LoRA files are read in lora_files / lora_weights and converted in lora_export; their names stay importable here
from .lora_export import export_lora, to_kohya, to_peft  # noqa: F401
from .lora_files import (LORA_WEIGHT_SUFFIXES, PICKLE_SUFFIXES, adapter_metadata, layer_name,  # noqa: F401
                         lora_file_format, lora_format, lora_weight_elements, read_lora, resolve_lora_file,
                         unknown_adapter_fields)
from .lora_weights import kohya_layers, peft_layers, resolve_kohya_names
from .sgm_names import sgm_aliases, uses_sgm_names
from .tokenizer import fast_only_tokenizers  # noqa: F401  (importable from here)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel

    from .lora_weights import LoraLayerWeights


EMBEDDED_BASES = {"sd": "tiny-sd", "sdxl": "tiny-sdxl"}
EMBEDDED_DEMO_LORAS = {"sd": "demo-lora", "sdxl": "demo-lora-sdxl"}


def _embedded_asset(names: dict[str, str], family: str) -> Path:
    if family not in names:
        raise ValueError(f"no embedded model of family {family!r}: choose one of {', '.join(names)}")
    return Path(str(resources.files("das_sd") / "assets" / names[family]))


def embedded_base_path(family: str = "sd") -> Path:
    """The folder of an embedded tiny base model shipped in the package (the offline default).

    Args:
        family: "sd": the tiny Stable Diffusion; "sdxl": the tiny SDXL.

    Returns:
        ``das_sd/assets/tiny-sd`` (or ``tiny-sdxl``) inside the installed package.

    Raises:
        ValueError: When ``family`` is neither "sd" nor "sdxl".
    """
    return _embedded_asset(EMBEDDED_BASES, family)


def embedded_demo_lora_path(family: str = "sd") -> Path:
    """The folder of a demo LoRA shipped in the package (trained on the demo dataset).

    Args:
        family: "sd": the tiny SD's demo LoRA; "sdxl": the tiny SDXL's.

    Returns:
        ``das_sd/assets/demo-lora`` (or ``demo-lora-sdxl``) inside the installed package.

    Raises:
        ValueError: When ``family`` is neither "sd" nor "sdxl".
    """
    return _embedded_asset(EMBEDDED_DEMO_LORAS, family)


def resolve_base(base: str | Path | None) -> Path:
    """The diffusers pipeline folder or single-file checkpoint ``base`` names, checked before
    anything is loaded from it.

    Args:
        base: A pipeline folder or a single-file SD 1.x / 2.x or SDXL ``.safetensors`` checkpoint
            (das_sd.models.single_file); None, "" or "embedded" for the embedded tiny SD.

    Returns:
        The folder or file, absolute.

    Raises:
        ModelError: When a folder has no ``model_index.json`` or has a component with pickled weights
            only, or a file is refused by ``single_file.check_single_file`` (pickled, SDXL, ...).
    """
    path = embedded_base_path() if base in (None, "", "embedded") else Path(base).expanduser().resolve()
    from .single_file import check_single_file, names_single_file

    if names_single_file(path):
        return check_single_file(path)
    if not (path / "model_index.json").is_file():
        raise ModelError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    refuse_pickled_components(path)
    return path


def refuse_pickled_components(path: Path) -> None:
    """Refuse a pipeline folder any of whose weighted components has pickled weights only.

    Left to themselves, diffusers and transformers fall back to ``pytorch_model.bin`` /
    ``diffusion_pytorch_model.bin`` when a folder has no safetensors file, and unpickling runs code
    from the file: das-sd never does that, whatever torch's weights-only loader would catch.

    Args:
        path: The pipeline folder; each subfolder is a component.

    Raises:
        ModelError: Naming the first pickled file of a component that has no .safetensors file.
    """
    for component in sorted(p for p in path.iterdir() if p.is_dir()):
        suffixes = {f.suffix.lower() for f in component.iterdir() if f.is_file()}
        pickled = sorted(f for f in component.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickled and ".safetensors" not in suffixes:
            raise ModelError(f"{pickled[0]}: pickled weights are never loaded (unpickling can run code from the "
                             f"file); convert the {component.name} component to safetensors, e.g. "
                             "`model.save_pretrained(DIR, safe_serialization=True)` on a machine you trust")


# model_index.json's pipeline class -> model family (das_sd.conditioning)
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


def pipeline_family(path: Path) -> str:
    """The model family of a pipeline folder, from its ``model_index.json``.

    Args:
        path: A pipeline folder (``resolve_base``).

    Returns:
        "sd" or "sdxl".

    Raises:
        ModelError: When the folder's pipeline class is not one das-sd attributes (an SDXL refiner,
            inpainting, SD3, Flux, ...), naming it and the supported ones.
    """
    index = path / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{index}: cannot read it ({exc})") from exc
    if name not in PIPELINE_FAMILIES:
        raise ModelError(f"{index}: a {name} folder; das-sd attributes text-to-image LoRAs of "
                         f"{' and '.join(PIPELINE_FAMILIES)} folders (SD 1.x / 2.x and SDXL base models)")
    return PIPELINE_FAMILIES[name]


def load_pipeline(base: str | Path | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load an SD 1.x / 2.x or SDXL pipeline folder with ``from_pretrained(local_files_only=True)``,
    or a single-file checkpoint with ``single_file.load_single_file`` (offline too).

    Safetensors only, without safety checker or feature extractor, progress bars off.

    Args:
        base: The pipeline folder or single-file checkpoint; None, "" or "embedded" for the
            embedded tiny SD.
        device: Where to put it; None for ``default_device()``.
        dtype: The weights' dtype.

    Returns:
        The pipeline on ``device``: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    Raises:
        ModelError: When the folder or file is refused (see ``resolve_base``, ``pipeline_family``)
            or diffusers / transformers cannot load it, or a text encoder misses weights.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = resolve_base(base)
    if path.is_file():
        from .single_file import load_single_file

        return load_single_file(path, device=device, dtype=dtype)
    family = pipeline_family(path)
    quiet_libraries()
    try:
        # diffusers would refuse a fast tokenizer for model_index.json's CLIPTokenizer: loaded
        # without it, registered after
        fast_tokenizers = fast_only_tokenizers(path, ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",))
        if family == "sdxl":
            from transformers import CLIPTextModelWithProjection

            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True, dtype=dtype,
                text_encoder=load_text_encoder(path / "text_encoder", dtype),
                text_encoder_2=load_text_encoder(path / "text_encoder_2", dtype, CLIPTextModelWithProjection),
                **dict.fromkeys(fast_tokenizers, None))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True, dtype=dtype,
                text_encoder=load_text_encoder(path / "text_encoder", dtype),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                **dict.fromkeys(fast_tokenizers, None))
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"{path}: cannot load the pipeline ({exc})") from exc
    if fast_tokenizers:
        pipe.register_modules(**fast_tokenizers)
    if model_family(pipe) != family:
        raise ModelError(f"{path}: a {family.upper()} pipeline folder whose UNet has the other family's "
                         "conditioning (addition_embed_type); das-sd cannot tell how to condition it")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def load_text_encoder(folder: Path, dtype: torch.dtype = torch.float32, model_class: type | None = None
                      ) -> CLIPTextModel:
    """The pipeline's text encoder, refused when any weight is missing from its file.

    transformers only logs missing keys and initialises them at random; a key layout written by a
    newer (or older) release than the one installed would give a random text encoder without error.

    Args:
        folder: The pipeline's ``text_encoder`` (or ``text_encoder_2``) folder (safetensors weights).
        dtype: The weights' dtype.
        model_class: The transformers class; None: ``CLIPTextModel`` (SDXL's second encoder is a
            ``CLIPTextModelWithProjection``).

    Returns:
        The text encoder, on the CPU.

    Raises:
        ModelError: When the file lacks any of the model's weights.
    """
    from transformers import CLIPTextModel

    model, info = (model_class or CLIPTextModel).from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True)
    missing = list(info.get("missing_keys") or [])
    if missing:
        import transformers

        raise ModelError(f"{folder}: transformers {transformers.__version__} does not find {len(missing)} of the "
                         f"text encoder's weights in its file (e.g. {missing[0]!r}); the checkpoint's key layout "
                         "comes from another transformers release")
    return model.to(dtype)


# ---------------------------------------------------------------------------------------------
# LoRAs into a pipeline

LORA_MODELS = ("unet", "text_encoder", "text_encoder_2")  # the pipeline parts a LoRA file may adapt

def load_lora(pipe: StableDiffusionPipeline, path: str | Path, adapter_name: str = "default") -> str:
    """Load a LoRA into ``pipe`` under ``adapter_name``; returns the detected format.

    diffusers files go through diffusers' ``load_lora_weights``. kohya and peft files are converted by
    das-sd (kohya layer names matched to the pipeline's module paths; per-layer ranks and alpha / rank
    scales, see ``lora_weights``) and loaded with a peft config naming each layer's rank and alpha:
    diffusers 0.42's own kohya conversion gives every attention layer (to_q/k/v/out) the file's most
    common alpha instead of its own.

    Args:
        pipe: The base pipeline; the LoRA is added to it in place.
        path: A LoRA file or folder (see ``resolve_lora_file``).
        adapter_name: The peft adapter name.

    Returns:
        The detected format: "diffusers", "peft" or "kohya".

    Raises:
        ModelError: When the path is refused, the file is not a readable LoRA, holds layers that are no
            LoRA pairs (LoHa, LoKr, Tucker ``lora_mid``, DoRA ``dora_scale``, ...) or mixes key styles
            (all refused before diffusers is called), the adapter name is taken, diffusers / peft
            cannot load it, or the UNet or text encoder holds other LoRA weights after loading than the
            file holds for it (what did load is taken out again).
    """
    file = resolve_lora_file(path)
    fmt = lora_file_format(file)
    state = load_file(str(file))
    if any(adapter_name in (getattr(getattr(pipe, m, None), "peft_config", None) or {}) for m in LORA_MODELS):
        raise ModelError(f"{file}: the pipeline already holds a LoRA named {adapter_name!r}")
    try:
        if fmt == "diffusers":
            unknown = unknown_adapter_fields(adapter_metadata(file))
            if unknown:
                import peft

                raise ModelError(f"its header's adapter config has fields that peft {peft.__version__} does not know "
                                 f"({', '.join(unknown[:4])}): it was written by a newer peft; upgrade peft "
                                 "(pip install -U peft) in this environment")
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
        else:
            if fmt == "kohya":
                modules = {name: [n for n, _ in getattr(pipe, name).named_modules()]
                           for name in LORA_MODELS if getattr(pipe, name, None) is not None}
                layers = kohya_layers(state)
                # sd-scripts names SDXL UNet layers by the original (SGM) module paths
                aliases = ({"unet": sgm_aliases(pipe.unet)}
                           if uses_sgm_names([n for m, n in layers if m == "unet"]) else None)
                layers = resolve_kohya_names(layers, modules, aliases)
            else:
                config_file = file.parent / "adapter_config.json"
                layers = peft_layers(state, json.loads(config_file.read_text()) if config_file.is_file() else None)
            _load_layers(pipe, layers, adapter_name)
    except ModelError as exc:
        _unload(pipe, adapter_name)
        raise ModelError(f"{file}: {exc}") from None
    except (ValueError, RuntimeError, KeyError) as exc:  # diffusers' and peft's own (key renaming, shapes)
        _unload(pipe, adapter_name)
        raise ModelError(f"{file}: diffusers / peft cannot load it ({exc})") from exc
    _refuse_partial_load(pipe, file, state, adapter_name)
    return fmt


def _unload(pipe: StableDiffusionPipeline, adapter_name: str) -> None:
    """Take the part of a refused LoRA that did load out of the pipeline again (the name was free before)."""
    try:
        pipe.delete_adapters(adapter_name)
    except Exception:  # noqa: BLE001 - nothing was loaded, or the pipeline is dropped with the error anyway
        pass


def _peft_config(layers: Mapping[str, LoraLayerWeights], anchored: bool) -> dict:
    """A peft ``LoraConfig`` (as a dict) giving each layer its own rank and alpha by its module path.

    peft matches a pattern against the end of a module path; UNet paths are anchored at the start
    too, text-encoder paths drop ``text_model.`` (transformers 5 has no such submodule).
    """
    def pattern(module: str) -> str:
        return ("^" if anchored else "") + re.escape(module.removeprefix("text_model."))

    first = next(iter(layers.values()))
    return {"r": first.rank, "lora_alpha": first.alpha,
            "rank_pattern": {pattern(m): layer.rank for m, layer in layers.items()},
            "alpha_pattern": {pattern(m): layer.alpha for m, layer in layers.items()},
            "target_modules": sorted(m.removeprefix("text_model.") for m in layers)}


def _load_layers(pipe: StableDiffusionPipeline, layers: Mapping[tuple[str, str], LoraLayerWeights],
                 adapter_name: str) -> None:
    """Load converted layers into the UNet and text encoder, as ``load_lora_weights`` does with a
    config of its own, then check every layer's rank and scale in the loaded model."""
    from peft.tuners.lora import LoraLayer

    for model in LORA_MODELS:
        part = {module: layer for (m, module), layer in layers.items() if m == model}
        if not part:
            continue
        state = {f"{model}.{module}.lora_{half}.weight": weight for module, layer in part.items()
                 for half, weight in (("A", layer.down), ("B", layer.up))}
        metadata = {f"{model}.{k}": v for k, v in _peft_config(part, anchored=model == "unet").items()}
        if model == "unet":
            pipe.load_lora_into_unet(state, network_alphas=None, unet=pipe.unet, adapter_name=adapter_name,
                                     metadata=metadata, _pipeline=pipe)
        else:
            pipe.load_lora_into_text_encoder(state, network_alphas=None, text_encoder=getattr(pipe, model),
                                             prefix=model, lora_scale=pipe.lora_scale, adapter_name=adapter_name,
                                             metadata=metadata, _pipeline=pipe)
        modules = dict(getattr(pipe, model).named_modules())
        for module, layer in part.items():
            loaded = modules.get(module, modules.get(module.removeprefix("text_model.")))
            if not isinstance(loaded, LoraLayer) or adapter_name not in loaded.r:
                continue  # counted by _refuse_partial_load
            if loaded.r[adapter_name] != layer.rank or not math.isclose(loaded.scaling[adapter_name], layer.scale,
                                                                        rel_tol=1e-12):
                raise ModelError(f"layer {module!r} loaded with rank {loaded.r[adapter_name]} and scale "
                                 f"{loaded.scaling[adapter_name]}, the file gives rank {layer.rank}, scale {layer.scale}")


def _adapter_layers(model: torch.nn.Module | None, adapter_name: str) -> tuple[set[str], int]:
    """(layer names in ``lora_files.layer_name`` spelling, LoRA weight elements) the adapter holds in ``model``."""
    from peft.tuners.lora import LoraLayer

    names, count = set(), 0
    for name, module in (model.named_modules() if model is not None else ()):
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            names.add(name.replace(".", "_").removeprefix("text_model_"))
            count += module.lora_A[adapter_name].weight.numel() + module.lora_B[adapter_name].weight.numel()
    return names, count


def _refuse_partial_load(pipe: StableDiffusionPipeline, file: Path, state: Mapping[str, torch.Tensor],
                         adapter_name: str) -> None:
    """Refuse (and unload) a LoRA of which the UNet or text encoder holds other LoRA weights than the file.

    diffusers drops keys it cannot place with at most a log line (a file mixing key styles, layers of
    modules the model lacks, a text_encoder_2 part), which would attribute over part of the LoRA.
    """
    expected = lora_weight_elements(state)
    for model in sorted(set(expected) | {"unet", "text_encoder"}):  # a text_encoder_2 part needs an SDXL pipeline
        names, loaded = _adapter_layers(getattr(pipe, model, None), adapter_name)
        if loaded == expected.get(model, 0):
            continue
        missed = sorted(k for k in state if k.endswith(LORA_WEIGHT_SUFFIXES) and layer_name(k)[0] == model
                        and layer_name(k)[1] not in names)
        _unload(pipe, adapter_name)
        example = f"; keys that did not load, e.g. {', '.join(missed[:3])}" if missed else ""
        raise ModelError(f"{file}: the file holds {expected.get(model, 0):,} LoRA weights for the {model}, but "
                         f"{loaded:,} loaded into it{example}. das-sd does not use a LoRA that loads only in part "
                         "(scores over part of it would be wrong without any sign)")
