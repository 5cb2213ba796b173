"""Load a Stable Diffusion 1.x pipeline folder (offline) and LoRA files in the formats people share.

LoRA formats:
- diffusers: ``pytorch_lora_weights.safetensors`` with ``unet.*.lora_A/lora_B`` (or the older
  ``lora.down/lora.up``) keys, as written by ``save_lora_weights`` and diffusers' training scripts;
- peft: ``adapter_model.safetensors`` (+ ``adapter_config.json``) with ``base_model.model.*`` keys;
- kohya / A1111: ``lora_unet_*.lora_down/lora_up/alpha`` keys, as written by sd-scripts.
Kohya and diffusers files go through diffusers' own ``load_lora_weights``; peft files are renamed to
diffusers keys with their ``lora_alpha / r`` scale folded into ``lora_B`` first. Only safetensors
are read: pickled checkpoints (.bin, .pt, .ckpt) are refused, never unpickled.
"""

from __future__ import annotations

import json
import stat
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..io import not_regular_message

if TYPE_CHECKING:
    from collections.abc import Iterable

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelError(ValueError):
    """A model or LoRA that cannot be used; the message names the path."""


def embedded_base_path() -> Path:
    """The folder of the embedded tiny Stable Diffusion shipped in the package (the offline default).

    Returns:
        ``das_sd/assets/tiny-sd`` inside the installed package.
    """
    return Path(str(resources.files("das_sd") / "assets" / "tiny-sd"))


def embedded_demo_lora_path() -> Path:
    """The folder of the demo LoRA shipped in the package (trained on the demo dataset).

    Returns:
        ``das_sd/assets/demo-lora`` inside the installed package.
    """
    return Path(str(resources.files("das_sd") / "assets" / "demo-lora"))


def resolve_base(base: str | Path | None) -> Path:
    """The diffusers pipeline folder or single-file checkpoint ``base`` names, checked before
    anything is loaded from it.

    Args:
        base: A pipeline folder or a single-file SD 1.x / 2.x ``.safetensors`` checkpoint
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


def quiet_libraries() -> None:
    """Silence the libraries' own loading bars and benign warnings; das-sd shows its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def default_device() -> torch.device:
    """The device das-sd runs on when none is given.

    Returns:
        CUDA when available, else the CPU.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(base: str | Path | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load a SD 1.x pipeline folder with ``from_pretrained(local_files_only=True)``, or a
    single-file checkpoint with ``single_file.load_single_file`` (offline too).

    Safetensors only, without safety checker or feature extractor, progress bars off.

    Args:
        base: The pipeline folder or single-file checkpoint; None, "" or "embedded" for the
            embedded tiny SD.
        device: Where to put it; None for ``default_device()``.
        dtype: The weights' dtype.

    Returns:
        The pipeline on ``device``.

    Raises:
        ModelError: When the folder or file is refused (see ``resolve_base``) or diffusers /
            transformers cannot load it, or the text encoder misses weights.
    """
    from diffusers import StableDiffusionPipeline

    path = resolve_base(base)
    if path.is_file():
        from .single_file import load_single_file

        return load_single_file(path, device=device, dtype=dtype)
    quiet_libraries()
    try:
        text_encoder = load_text_encoder(path / "text_encoder", dtype)
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, dtype=dtype, text_encoder=text_encoder,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"{path}: cannot load the pipeline ({exc})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def load_text_encoder(folder: Path, dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """The pipeline's CLIPTextModel, refused when any weight is missing from its file.

    transformers only logs missing keys and initialises them at random; a key layout written by a
    newer (or older) release than the one installed would give a random text encoder without error.

    Args:
        folder: The pipeline's ``text_encoder`` folder (safetensors weights).
        dtype: The weights' dtype.

    Returns:
        The text encoder, on the CPU.

    Raises:
        ModelError: When the file lacks any of the model's weights.
    """
    from transformers import CLIPTextModel

    model, info = CLIPTextModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                output_loading_info=True)
    missing = list(info.get("missing_keys") or [])
    if missing:
        import transformers

        raise ModelError(f"{folder}: transformers {transformers.__version__} does not find {len(missing)} of the "
                         f"text encoder's weights in its file (e.g. {missing[0]!r}); the checkpoint's key layout "
                         "comes from another transformers release")
    return model.to(dtype)


# ---------------------------------------------------------------------------------------------
# LoRA files

def resolve_lora_file(path: str | Path) -> Path:
    """The LoRA weights file a path names, checked before it is read.

    Args:
        path: A .safetensors file, or a folder holding ``pytorch_lora_weights.safetensors``,
            ``adapter_model.safetensors`` or a single .safetensors file.

    Returns:
        The file, absolute.

    Raises:
        ModelError: When no weights file is found, the path is missing, unreadable or not a regular
            file, or the file is a pickled checkpoint or not .safetensors.
    """
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        for name in LORA_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(found) == 1:
            return found[0]
        raise ModelError(f"{path}: no LoRA weights ({' or '.join(LORA_WEIGHT_NAMES)}) in the folder")
    try:
        mode = path.stat().st_mode  # stat never blocks; opening a FIFO would
    except FileNotFoundError:
        raise ModelError(f"{path}: LoRA file not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise ModelError(not_regular_message(path, mode, "LoRA .safetensors file or folder"))
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{path}: pickled checkpoints are not loaded (unsafe); convert it to safetensors")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: expected a .safetensors LoRA file")
    return path


def lora_format(keys: Iterable[str]) -> str:
    """The format of a LoRA state dict, from its key names.

    Args:
        keys: The state dict's keys.

    Returns:
        "kohya" (``lora_unet_*`` / ``lora_te_*``), "peft" (``base_model.model.*``) or "diffusers"
        (``unet.*`` / ``text_encoder.*``).

    Raises:
        ModelError: When no key has any of those prefixes.
    """
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    raise ModelError("unrecognised LoRA key layout (expected diffusers 'unet.*', peft "
                     "'base_model.model.*' or kohya 'lora_unet_*' keys)")


def _lora_file_format(file: Path) -> str:
    try:
        with safe_open(str(file), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{file}: not a readable safetensors file ({exc})") from exc
    try:
        return lora_format(keys)
    except ModelError as exc:
        raise ModelError(f"{file}: {exc}") from None


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, format) of a LoRA file or folder.

    Args:
        path: A LoRA file or folder (see ``resolve_lora_file``).

    Returns:
        The tensors by key name, on the CPU, and the format ("diffusers", "peft" or "kohya").

    Raises:
        ModelError: When the path is refused or the file is not a readable LoRA.
    """
    file = resolve_lora_file(path)
    fmt = _lora_file_format(file)
    return load_file(str(file)), fmt


def peft_to_diffusers(state: dict[str, torch.Tensor], config: dict | None) -> dict[str, torch.Tensor]:
    """Rename peft keys to diffusers' and fold the lora_alpha / r scale into lora_B.

    Args:
        state: A peft UNet adapter's state dict (``base_model.model.*`` keys).
        config: Its ``adapter_config.json``; None or without ``r`` / ``lora_alpha``: no scaling.

    Returns:
        The state dict with ``unet.*`` keys.
    """
    config = config or {}
    out = {}
    for key, value in state.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_B." in name and config.get("r") and config.get("lora_alpha"):
            value = value * (float(config["lora_alpha"]) / float(config["r"]))
        out[f"unet.{name}"] = value
    return out


def load_lora(pipe: StableDiffusionPipeline, path: str | Path, adapter_name: str = "default") -> str:
    """Load a LoRA into ``pipe`` under ``adapter_name``; returns the detected format.

    Args:
        pipe: The base pipeline; the LoRA is added to it in place.
        path: A LoRA file or folder (see ``resolve_lora_file``).
        adapter_name: The peft adapter name.

    Returns:
        The detected format: "diffusers", "peft" or "kohya".

    Raises:
        ModelError: When the path is refused or the file is not a readable LoRA.
    """
    file = resolve_lora_file(path)
    fmt = _lora_file_format(file)
    if fmt == "peft":
        config_file = file.parent / "adapter_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        pipe.load_lora_weights(peft_to_diffusers(load_file(str(file)), config), adapter_name=adapter_name)
    else:  # diffusers reads kohya and its own files (with their adapter metadata) itself
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
    return fmt


_DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight", ".lora_linear_layer.down.weight")
_UP_SUFFIXES = (".lora_B.weight", ".lora.up.weight", ".lora_up.weight", ".lora_linear_layer.up.weight")


def _split_lora_key(key: str) -> tuple[str, str, str]:
    """('unet' | 'text_encoder', module path, 'down' | 'up') for a diffusers LoRA key."""
    model = next((m for m in ("unet", "text_encoder") if key.startswith(m + ".")), None)
    if model is None:
        raise ModelError(f"LoRA key {key!r} is neither a UNet ('unet.') nor a text-encoder ('text_encoder.') key")
    for kind, suffixes in (("down", _DOWN_SUFFIXES), ("up", _UP_SUFFIXES)):
        for suffix in suffixes:
            if key.endswith(suffix):
                module = key[len(model) + 1:-len(suffix)]
                if model == "text_encoder" and not module.startswith("text_model."):
                    module = "text_model." + module  # transformers 5 layout -> the usual one
                return model, module, kind
    raise ModelError(f"unrecognised LoRA key {key!r}")


def to_kohya(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers LoRA state dict (UNet and text encoder) to kohya / A1111 naming
    (alpha = rank, scale 1).

    Args:
        state: A diffusers LoRA state dict (``unet.*`` / ``text_encoder.*`` keys).

    Returns:
        The state dict with ``lora_unet_*`` / ``lora_te_*`` keys and an ``alpha`` per layer.

    Raises:
        ModelError: When a key is not a diffusers LoRA key.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        model, module, kind = _split_lora_key(key)
        name = ("lora_unet_" if model == "unet" else "lora_te_") + module.replace(".", "_")
        out[f"{name}.lora_{kind}.weight"] = value.contiguous()
        if kind == "down":
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers UNet LoRA state dict to peft ``adapter_model.safetensors`` naming.

    Args:
        state: A diffusers LoRA state dict with UNet keys only.

    Returns:
        The state dict with ``base_model.model.*.lora_A`` / ``lora_B`` keys.

    Raises:
        ModelError: When the LoRA also has text-encoder layers, or a key is not a diffusers LoRA key.
    """
    out = {}
    for key, value in state.items():
        model, module, kind = _split_lora_key(key)
        if model != "unet":
            raise ModelError("a peft adapter file holds one model, and this LoRA also has text-encoder layers "
                             f"(e.g. {key!r}); convert it to kohya instead")
        out[f"base_model.model.{module}.lora_{'A' if kind == 'down' else 'B'}.weight"] = value.contiguous()
    return out


def export_lora(lora: str | Path, to: str, out: str | Path) -> Path:
    """`das-sd export-lora`: write a diffusers-format LoRA (as das-sd trains them) in kohya naming
    (A1111, ComfyUI) or as a peft adapter file, atomically; returns ``out``.

    Args:
        lora: The diffusers-format LoRA file or folder.
        to: The target naming: "kohya" or "peft".
        out: The file to write; its folder is created.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: When ``to`` is neither "kohya" nor "peft".
        ModelError: When the LoRA is not a readable diffusers-format LoRA, or cannot be converted.
    """
    from safetensors.torch import save

    from ..io import atomic_write_bytes

    converters = {"kohya": to_kohya, "peft": to_peft}
    if to not in converters:
        raise ValueError(f"--to {to!r}: expected one of {sorted(converters)}")
    state, fmt = read_lora(lora)
    if fmt != "diffusers":
        raise ModelError(f"{lora}: export converts diffusers-format LoRAs (this one is {fmt})")
    converted = converters[to](state)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(converted, metadata={"format": "pt", "das_sd_export": to}))
    return out
