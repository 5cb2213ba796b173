"""Single-file SD 1.x / 2.x and SDXL checkpoints (A1111 / Forge / ComfyUI ``.safetensors``), loaded offline.

A single file holds the original (CompVis LDM / SGM) weights of the UNet (``model.diffusion_model.*``),
the VAE (``first_stage_model.*``) and the text encoder (``cond_stage_model.*``; SDXL's two:
``conditioner.embedders.0.transformer.*``, CLIP, and ``conditioner.embedders.1.model.*``, OpenCLIP),
without configs and without the tokenizers. das-sd loads it through diffusers' ``from_single_file`` with ``config=`` a
local folder, which makes no hub call:

- the family comes from the file's header (key names and shapes, no tensor read): CLIP keys
  (``cond_stage_model.transformer.*``, 768-wide cross-attention) are SD 1.x, OpenCLIP keys
  (``cond_stage_model.model.*``, 1024 wide) SD 2.x, both ``conditioner.embedders`` SDXL base; SDXL
  refiners, inpainting and other UNets are refused;
- the component configs are the ones das-sd ships (das_sd/models/single_file_configs.py), unless a
  folder is given (``config=`` or ``$DAS_SD_SINGLE_FILE_CONFIG``) for another architecture;
- the prediction type (the weights cannot tell SD 2.x's 768 v-prediction models from its 512-base
  epsilon ones): ``$DAS_SD_PREDICTION_TYPE``, else the given config folder's scheduler, else the
  file's ModelSpec metadata (``modelspec.prediction_type`` / ``modelspec.architecture``), else an
  A1111 config ``<file>.yaml`` beside it (``parameterization: "v"``); SD 1.x and SDXL default to
  epsilon and an SD 2.x file with none of these is refused rather than guessed;
- the tokenizer (the CLIP BPE vocabulary, which das-sd does not ship): ``tokenizer=`` or
  ``$DAS_SD_TOKENIZER`` (a folder with a CLIPTokenizer, used as it is), else the given config
  folder's ``tokenizer/``, else the Hugging Face cache (``local_files_only``), else a ModelError that
  says which one-time download provides it (das_sd.models.tokenizer).

Pickled checkpoints (.ckpt, .pt, .bin) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import open_regular, read_safetensors_header
from .errors import ModelError
from .lora_files import PICKLE_SUFFIXES, checked_safetensors_file
from .runtime import default_device, quiet_libraries
from .single_file_configs import shipped_config
from .tokenizer import CLIP_VOCAB_SIZE, resolve_tokenizer

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

SINGLE_FILE_SUFFIXES = (".safetensors",)
CONFIG_ENV, PREDICTION_ENV = "DAS_SD_SINGLE_FILE_CONFIG", "DAS_SD_PREDICTION_TYPE"

_UNET = "model.diffusion_model."
_SD_TEXT = "cond_stage_model."
_CLIP, _OPEN_CLIP = _SD_TEXT + "transformer.", _SD_TEXT + "model."
_SDXL = "conditioner.embedders."
_SDXL_CLIP, _SDXL_OPEN_CLIP = _SDXL + "0.transformer.", _SDXL + "1.model."


def names_single_file(path: Path) -> bool:
    """Whether ``--base`` names a single-file checkpoint rather than a pipeline folder: anything
    there that is not a folder, or a missing path with a checkpoint suffix.

    Args:
        path: The ``--base`` path, resolved.

    Returns:
        True for a file (or FIFO, device...), or a missing ``*.safetensors`` / pickle path.
    """
    if path.is_dir():
        return False
    return os.path.lexists(path) or path.suffix.lower() in SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES


def read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, ``__metadata__``) of a safetensors file, without reading a tensor.

    Args:
        path: The file (regular files only).

    Returns:
        The shapes by name and the header's metadata strings (empty when it has none).

    Raises:
        ModelError: When the file cannot be read or is not a safetensors file.
    """
    try:
        with open_regular(path, "single-file .safetensors checkpoint") as fh:
            header, _ = read_safetensors_header(fh)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a readable single-file checkpoint ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    return {k: list(v["shape"]) for k, v in header.items()}, metadata


def text_encoder_family(keys: Iterable[str]) -> str | None:
    """The family that a checkpoint's text-encoder names claim, without any further check.

    Args:
        keys: Tensor names of a single-file checkpoint.

    Returns:
        "sdxl" (``conditioner.embedders.*``), "sd" (``cond_stage_model.*``: SD 1.x or 2.x), or None.
    """
    keys = list(keys)
    if any(k.startswith(_SDXL) for k in keys):
        return "sdxl"
    return "sd" if any(k.startswith(_SD_TEXT) for k in keys) else None


def detect_family(shapes: Mapping[str, list[int]]) -> str:
    """The model family of a single-file checkpoint, from its tensor names and shapes.

    Args:
        shapes: Tensor name -> shape (``read_header``).

    Returns:
        "sd1" (CLIP ViT-L text encoder, SD 1.x UNet), "sd2" (OpenCLIP text encoder, SD 2.x UNet) or
        "sdxl" (SDXL base: CLIP and OpenCLIP text encoders).

    Raises:
        ModelError: For SDXL refiners, inpainting / depth / upscaler UNets, a LoRA or diffusers-layout
            file, a file without UNet, VAE or text-encoder weights, or one that mixes SD 1.x and 2.x parts.
    """
    keys = list(shapes)
    if text_encoder_family(keys) == "sdxl":
        return _sdxl_family(keys)
    if not any(k.startswith(_UNET) for k in keys):
        if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_" in k for k in keys):
            raise ModelError("a LoRA file, not a base model: pass it with --lora")
        if any(k.startswith(("down_blocks.", "encoder.", "text_model.", "decoder.")) for k in keys):
            raise ModelError("one component of a diffusers pipeline: pass the pipeline folder that holds it")
        raise ModelError(f"not an SD 1.x / 2.x checkpoint (no {_UNET}* UNet weights in the original layout)")
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight", [])
    if len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelError(f"the UNet takes {conv_in[1]} input channels (an inpainting, depth or upscaling model); "
                         "das-sd loads text-to-image checkpoints (4 latent channels)")
    if not any(k.startswith("first_stage_model.") for k in keys):
        raise ModelError("the checkpoint has no VAE weights (first_stage_model.*); das-sd needs the whole pipeline")
    clip, open_clip = (any(k.startswith(p) for k in keys) for p in (_CLIP, _OPEN_CLIP))
    if clip == open_clip:
        raise ModelError("the checkpoint has " + ("both CLIP and OpenCLIP" if clip else "no") +
                         f" text-encoder weights ({_CLIP}* for SD 1.x, {_OPEN_CLIP}* for SD 2.x)")
    family = "sd1" if clip else "sd2"
    # the cross-attention width of the full-size models confirms the text encoder's family
    widths = {shapes[k][-1] for k in keys if k.startswith(_UNET) and k.endswith("attn2.to_k.weight")}
    expected = {"sd1": 768, "sd2": 1024}
    if widths & set(expected.values()) and expected[family] not in widths:
        raise ModelError(f"the text encoder is {family.upper()}'s but the UNet's cross-attention is "
                         f"{sorted(widths)} wide: a mix of SD 1.x and SD 2.x parts")
    return family


def _sdxl_family(keys: list[str]) -> str:
    """"sdxl" for an SDXL base checkpoint's keys; the refusal of what else has SGM text encoders."""
    if not any(k.startswith(_SDXL_CLIP) for k in keys) and any(k.startswith(_SDXL + "0.model.") for k in keys):
        raise ModelError("an SDXL refiner (one OpenCLIP text encoder, conditioner.embedders.0.model.*); das-sd "
                         "attributes text-to-image LoRAs of SDXL base models")
    for prefix, what in ((_SDXL_CLIP, "CLIP"), (_SDXL_OPEN_CLIP, "OpenCLIP"), (_UNET, "UNet"),
                         ("first_stage_model.", "VAE")):
        if not any(k.startswith(prefix) for k in keys):
            raise ModelError(f"an SDXL checkpoint without {what} weights ({prefix}*); das-sd needs the whole pipeline")
    return "sdxl"


def check_single_file(path: str | Path) -> Path:
    """Check a single-file checkpoint before anything is loaded from it (``resolve_base`` for files).

    Args:
        path: The checkpoint.

    Returns:
        The path, absolute.

    Raises:
        ModelError: When it is missing, not a regular file, pickled (.ckpt, .pt, .bin...), not
            .safetensors, unreadable, or not an SD 1.x / 2.x checkpoint (``detect_family``); the
            message names the file.
    """
    path = checked_safetensors_file(Path(path).expanduser().resolve(), "checkpoint file",
                                    "single-file .safetensors checkpoint or a diffusers pipeline folder")
    try:
        detect_family(read_header(path)[0])
    except ModelError as exc:
        if str(exc).startswith(f"{path}:"):
            raise
        raise ModelError(f"{path}: {exc}") from None
    return path


def _prediction_from_metadata(path: Path, shapes: Mapping[str, list[int]], metadata: dict[str, str]) -> str | None:
    """What the file says about its prediction type, if anything: ModelSpec metadata, a ``v_pred``
    marker tensor, or an A1111 config ``<file>.yaml`` beside it."""
    spec = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if spec in ("v", "v_prediction", "v-prediction", "velocity"):
        return "v_prediction"
    if spec in ("epsilon", "eps"):
        return "epsilon"
    architecture = str(metadata.get("modelspec.architecture", "")).lower()
    if architecture.startswith("stable-diffusion-v2-768-v"):
        return "v_prediction"
    if architecture.startswith(("stable-diffusion-v1", "stable-diffusion-v2-512")):
        return "epsilon"
    if "v_pred" in shapes:
        return "v_prediction"
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        import yaml

        try:
            params = (yaml.safe_load(sidecar.read_text()) or {}).get("model", {}).get("params", {})
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            raise ModelError(f"{sidecar}: cannot read the checkpoint's config ({exc})") from None
        return "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    return None


def resolve_prediction_type(path: Path, family: str, config: Path | None = None) -> str:
    """The prediction type a single-file checkpoint is loaded with (see the module's docstring for the order).

    Args:
        path: The checkpoint.
        family: Its ``detect_family``.
        config: The config folder given for it, if any (its scheduler config counts).

    Returns:
        "epsilon", "v_prediction" or "sample".

    Raises:
        ModelError: When ``$DAS_SD_PREDICTION_TYPE`` is not a known type, or an SD 2.x file says nothing.
    """
    from ..registry import PREDICTION_TYPES

    explicit = os.environ.get(PREDICTION_ENV, "").strip()
    if explicit:
        if explicit not in PREDICTION_TYPES:
            raise ModelError(f"${PREDICTION_ENV}={explicit!r}: expected one of {', '.join(PREDICTION_TYPES)}")
        return explicit
    if config is not None:
        scheduler = config / "scheduler" / "scheduler_config.json"
        if scheduler.is_file():
            return json.loads(scheduler.read_text()).get("prediction_type", "epsilon")
    shapes, metadata = read_header(path)
    found = _prediction_from_metadata(path, shapes, metadata)
    if found is not None or family in ("sd1", "sdxl"):
        return found or "epsilon"
    raise ModelError(f"{path}: an SD 2.x checkpoint, whose weights do not say whether it predicts v (the 768 px "
                     "models: 2.0-v, 2.1) or the noise (the 512 px base models): set "
                     f"{PREDICTION_ENV}=v_prediction or {PREDICTION_ENV}=epsilon, or put its A1111 config "
                     f"{path.with_suffix('.yaml').name} beside it")


def config_folder(path: Path, family: str, prediction_type: str, config: Path | None = None) -> Path:
    """The diffusers config folder for a checkpoint: the given one, else das-sd's shipped one.

    Args:
        path: The checkpoint, named in the errors.
        family: Its ``detect_family``.
        prediction_type: Its ``resolve_prediction_type``; picks SD 2.x's 768-v or 512-base configs.
        config: The given config folder (``given_config``), or None for the shipped configs.

    Returns:
        The folder.

    Raises:
        ModelError: When a given folder has no model_index.json.
    """
    if config is not None:
        if not (config / "model_index.json").is_file():
            raise ModelError(f"{path}: the config folder {config} has no model_index.json (a diffusers pipeline "
                             "folder's configs are needed: model_index.json, unet/, vae/, text_encoder/, scheduler/)")
        return config
    if family in ("sd1", "sdxl"):
        return shipped_config(family)
    return shipped_config("sd2-768-v" if prediction_type == "v_prediction" else "sd2-512-base")


def given_config(config: str | Path | None = None) -> Path | None:
    """The config folder given for single-file checkpoints, if any.

    Args:
        config: A folder; None: ``$DAS_SD_SINGLE_FILE_CONFIG`` when set.

    Returns:
        The folder, absolute; None when neither names one.
    """
    given = config or os.environ.get(CONFIG_ENV) or None
    return Path(given).expanduser().resolve() if given else None


def load_single_file(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                     config: str | Path | None = None, tokenizer: str | Path | None = None
                     ) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load a single-file SD 1.x / 2.x or SDXL checkpoint offline as a StableDiffusion(XL)Pipeline.

    Args:
        path: The ``.safetensors`` checkpoint.
        device: Where to put it; None for ``default_device()``.
        dtype: The weights' dtype.
        config: A diffusers config folder for the checkpoint (for architectures other than SD 1.x /
            2.x's); None: ``$DAS_SD_SINGLE_FILE_CONFIG``, else the configs das-sd ships.
        tokenizer: A CLIPTokenizer folder (SDXL: for both tokenizers, or a folder with ``tokenizer/``
            and ``tokenizer_2/``); None: see ``resolve_tokenizer``.

    Returns:
        The pipeline, without safety checker or feature extractor, progress bars off, on ``device``.

    Raises:
        ModelError: When the file is refused (``check_single_file``), its prediction type or
            tokenizer cannot be resolved, diffusers cannot load it, or any weight of the UNet, VAE or
            text encoder is missing from it.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = check_single_file(path)
    family = detect_family(read_header(path)[0])
    given = given_config(config)
    prediction = resolve_prediction_type(path, family, given)
    folder = config_folder(path, family, prediction, given)
    tok = resolve_tokenizer(family, tokenizer, given, path, _vocab_size(folder / "text_encoder"))
    quiet_libraries()
    try:
        scheduler = _scheduler(folder, prediction)
        if family == "sdxl":
            tok_2 = resolve_tokenizer("sdxl-2", tokenizer, given, path, _vocab_size(folder / "text_encoder_2"))
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(folder), local_files_only=True, tokenizer=tok, tokenizer_2=tok_2,
                scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(folder), local_files_only=True, tokenizer=tok,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, SingleFileComponentError) as exc:
        # diffusers builds each model on the meta device and fills in what the file has: a weight the
        # file lacks stays on meta, and moving the model then fails (never a silently random weight)
        missing = (_missing_weights(path, folder) or "some of the text encoder's weights are not in the checkpoint "
                   f"for the configs in {folder}") if "meta" in str(exc) else None
        raise ModelError(f"{path}: " + (missing or f"cannot load the checkpoint with the configs in {folder} ({exc})")) \
            from exc
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # in case diffusers leaves them on meta quietly
        found = [n for n, t in getattr(pipe, name).state_dict().items() if t.is_meta] if hasattr(pipe, name) else []
        if found:
            raise ModelError(f"{path}: {len(found)} of the {name}'s weights are not in the checkpoint "
                             f"(e.g. {found[0]!r}) for the configs in {folder}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device(), dtype)


def _vocab_size(folder: Path) -> int:
    """The vocabulary size a text-encoder config folder gives (CLIP's when it has no config)."""
    config = folder / "config.json"
    return json.loads(config.read_text()).get("vocab_size", CLIP_VOCAB_SIZE) if config.is_file() else CLIP_VOCAB_SIZE


def _missing_weights(path: Path, folder: Path) -> str | None:
    """Which UNet or VAE weights the checkpoint lacks, or has in another shape, for ``folder``'s
    configs, found by diffusers' own original -> diffusers renaming applied to the header (on the
    meta device, nothing read); None when the UNet and VAE are complete."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in read_header(path)[0].items()}
    for name, cls, convert in (("unet", UNet2DConditionModel, convert_ldm_unet_checkpoint),
                               ("vae", AutoencoderKL, convert_ldm_vae_checkpoint)):
        config = cls.load_config(folder / name)
        with torch.device("meta"):
            expected = cls.from_config(config).state_dict()
        found = convert(checkpoint=dict(checkpoint), config=config)
        missing = sorted(set(expected) - set(found))
        if missing:
            return (f"{len(missing)} of the {name}'s weights are not in the checkpoint (e.g. {missing[0]!r}) "
                    f"for the configs in {folder}")
        other = sorted(k for k in expected if found[k].shape != expected[k].shape)
        if other:
            return (f"{len(other)} of the {name}'s weights have other shapes than the configs in {folder} give "
                    f"(e.g. {other[0]!r}: {list(found[other[0]].shape)}, not {list(expected[other[0]].shape)})")
    return None


def _scheduler(folder: Path, prediction_type: str):
    """The config folder's scheduler with ``prediction_type`` (which may come from elsewhere)."""
    import diffusers

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"))
    return cls.from_config({**config, "prediction_type": prediction_type})
