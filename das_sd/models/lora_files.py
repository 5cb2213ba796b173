"""LoRA files as people share them: find and read one, tell its key style, refuse what das-sd cannot
load, and count its LoRA weights (``lora_weights`` reads its layers with their ranks and scales).

Key styles (one per file):
- diffusers: ``unet.*`` / ``text_encoder.*`` keys (``lora_A/lora_B``, ``lora.down/lora.up`` or
  ``lora_linear_layer.down/up``) and the adapters' ``LoraConfig`` in the safetensors header
  (``lora_adapter_metadata``), as ``save_lora_weights`` and das-sd's ``train-lora`` write them;
- peft: ``adapter_model.safetensors`` (``base_model.model.*`` keys) + ``adapter_config.json``;
- kohya / A1111: ``lora_unet_*`` / ``lora_te_*`` keys, ``lora_down/lora_up`` and an ``alpha`` per layer.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..io import not_regular_message
from .errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from peft import LoraConfig

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry: "unet.r", "unet.lora_alpha", ...

KEY_PREFIXES = {"kohya": ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"), "peft": ("base_model.model.",),
                "diffusers": ("unet.", "text_encoder.", "text_encoder_2.")}
KOHYA_MODELS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                "lora_te2_": "text_encoder_2"}
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
KOHYA_HALVES = {"lora_down.weight": "down", "lora_up.weight": "up"}
DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight", ".lora_linear_layer.down.weight")
UP_SUFFIXES = (".lora_B.weight", ".lora.up.weight", ".lora_up.weight", ".lora_linear_layer.up.weight")
# diffusers' older attention-processor keys (``attn1.processor.to_q_lora.down.weight``)
LEGACY_SUFFIXES = ("_lora.down.weight", "_lora.up.weight")
LORA_WEIGHT_SUFFIXES = DOWN_SUFFIXES + UP_SUFFIXES + LEGACY_SUFFIXES

# Layer kinds that are not LoRA pairs, by a marker of their keys. diffusers cannot load them into a SD 1.x /
# 2.x pipeline (it fails with a key-renaming error) or, for DoRA's kohya ``dora_scale``, drops them with a
# log line and loads a plain LoRA: a different model.
UNSUPPORTED_KINDS = (
    (".hada_", "LoHa (LyCORIS hada_w1_a / hada_w1_b / ...)"),
    (".lokr_", "LoKr (LyCORIS lokr_w1 / lokr_w2 / ...)"),
    (".lora_mid.", "LoCon with a Tucker core (LyCORIS lora_mid)"),
    (".dora_scale", "DoRA (dora_scale)"),
    (".oft_", "OFT (LyCORIS oft_blocks / oft_diag)"),
)
SUPPORTED = ("das-sd loads LoRA layers (lora_down / lora_up with an alpha, or lora_A / lora_B) on linear and conv "
             "layers (LoCon included) from kohya, diffusers or peft files")


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
    return checked_safetensors_file(path, "LoRA file", "LoRA .safetensors file or folder")


def checked_safetensors_file(path: Path, what: str, expected: str) -> Path:
    """Refuse, before anything opens it, a path that is not a regular .safetensors file.

    Args:
        path: The file, absolute.
        what: What it should be, for "not found" (e.g. "LoRA file").
        expected: What a right path is, for the other refusals (e.g. "LoRA .safetensors file or folder").

    Returns:
        ``path``.

    Raises:
        ModelError: When it is missing, unreadable, not a regular file (a FIFO, a device), a pickled
            checkpoint (never unpickled) or not .safetensors; the message names the file.
    """
    try:
        mode = path.stat().st_mode  # stat never blocks; opening a FIFO would
    except FileNotFoundError:
        raise ModelError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise ModelError(not_regular_message(path, mode, expected))
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{path}: pickled checkpoints are never loaded (unpickling can run code from the file); "
                         "convert it to .safetensors on a machine you trust (e.g. load it with "
                         "`torch.load(FILE, weights_only=True)` and write its state dict with "
                         "`safetensors.torch.save_file`) and pass the .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: expected a {expected}")
    return path


def key_style(key: str) -> str | None:
    """The style a LoRA key is written in, from its prefix.

    Args:
        key: A LoRA state dict key.

    Returns:
        "kohya", "peft", "diffusers", or None for none of them.
    """
    return next((style for style, prefixes in KEY_PREFIXES.items() if key.startswith(prefixes)), None)


def _unsupported_kind(key: str) -> str | None:
    kind = next((kind for marker, kind in UNSUPPORTED_KINDS if marker in key), None)
    if kind is None and key_style(key) == "kohya" and key.split(".", 1)[-1] not in KOHYA_PARTS:
        kind = f"kohya {key.split('.', 1)[-1]!r}"  # kohya LoRA files hold down, up and alpha, nothing else
    return kind


def lora_format(keys: Iterable[str]) -> str:
    """The format of a LoRA state dict, from its key names, refusing what diffusers would not load whole.

    Args:
        keys: The state dict's keys.

    Returns:
        "kohya" (``lora_unet_*`` / ``lora_te_*``), "peft" (``base_model.model.*``) or "diffusers"
        (``unet.*`` / ``text_encoder.*``).

    Raises:
        ModelError: When a key belongs to a layer kind that is not a LoRA pair (LoHa, LoKr, Tucker
            ``lora_mid``, DoRA ``dora_scale``, ...), a key has none of the prefixes, or the keys mix
            styles (diffusers loads one style per file and drops the rest without an error).
    """
    keys = list(keys)
    for key in keys:
        kind = _unsupported_kind(key)
        if kind is not None:
            raise ModelError(f"{kind} layers (e.g. key {key!r}) cannot be loaded: {SUPPORTED}")
    examples: dict[str | None, str] = {}
    for key in keys:
        examples.setdefault(key_style(key), key)
    if None in examples or not examples:
        where = f" (key {examples[None]!r})" if None in examples else " (no keys)"
        raise ModelError(f"unrecognised LoRA key layout{where}: expected diffusers 'unet.*', peft "
                         "'base_model.model.*' or kohya 'lora_unet_*' keys")
    if len(examples) > 1:
        mixed = ", ".join(f"{style} (e.g. {key!r})" for style, key in examples.items())
        raise ModelError(f"its keys mix styles: {mixed}; diffusers loads one style per file and would drop "
                         "the others without an error: convert the file to one style")
    return next(iter(examples))


def lora_file_format(file: Path) -> str:
    """``lora_format`` of a safetensors file's keys, read from its header only.

    Args:
        file: The LoRA .safetensors file.

    Returns:
        "diffusers", "peft" or "kohya".

    Raises:
        ModelError: Naming the file, when it is not a readable safetensors file or ``lora_format``
            refuses its keys.
    """
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
    fmt = lora_file_format(file)
    return load_file(str(file)), fmt


def adapter_metadata(file: str | Path) -> dict | None:
    """The adapters' ``LoraConfig`` diffusers records in a LoRA file's header (``lora_adapter_metadata``).

    Args:
        file: A LoRA .safetensors file.

    Returns:
        The config entries with their model prefix ("unet.lora_alpha", "text_encoder.r", ...), or None
        when the file records none.

    Raises:
        ModelError: When the entry is not JSON.
    """
    with safe_open(str(file), framework="pt") as fh:
        raw = (fh.metadata() or {}).get(ADAPTER_METADATA_KEY)
    try:
        return json.loads(raw) if raw else None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{file}: its {ADAPTER_METADATA_KEY} header entry is not JSON ({exc})") from None


_ALWAYS_RECORDED = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")


def portable_adapter_config(config: LoraConfig) -> dict:
    """A peft ``LoraConfig`` as the file header records it, for any peft release: only the rank, the
    alpha, the target modules, the per-layer patterns and the fields that differ from their defaults.

    diffusers rebuilds the config with ``LoraConfig(**entries)``; a full ``to_dict()`` holds every field
    of the writing release (peft 0.18 added ``alora_invocation_tokens``, later ones more), which an
    older peft refuses as unknown keyword arguments. Left out at their defaults, they read the same.
    The patterns stay even when empty: diffusers 0.35 reads ``rank_pattern`` from the header unasked.

    Args:
        config: The adapter's ``peft.LoraConfig``.

    Returns:
        The header entries (without the model prefix).
    """
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    entries = {k: v for k, v in config.to_dict().items()
               if k in _ALWAYS_RECORDED or k not in defaults or _differs(v, defaults[k])}
    # sets (target_modules) sorted: the header reads the same on every run
    return {k: sorted(v) if isinstance(v, set) else v for k, v in entries.items()}


def _differs(value, default) -> bool:
    if isinstance(value, (set, list, tuple)) and isinstance(default, (set, list, tuple)):
        return set(value) != set(default)  # target_modules: a set, written as a list
    return value != default


def unknown_adapter_fields(metadata: dict | None) -> list[str]:
    """The header's ``LoraConfig`` fields that the installed peft does not know (written by a newer
    peft), which diffusers would pass to ``LoraConfig`` and fail on.

    Args:
        metadata: ``adapter_metadata`` of a file ("unet.r", ...), or None.

    Returns:
        The unknown entries with their prefix, sorted; [] when all are known.
    """
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    return sorted(k for k in (metadata or {}) if k.split(".", 1)[-1] not in known)


def lora_metadata(file: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (kohya's ``ss_*`` training entries, ...).

    Args:
        file: A LoRA .safetensors file.

    Returns:
        The entries; empty when the file has none.
    """
    with safe_open(str(file), framework="pt") as fh:
        return dict(fh.metadata() or {})


def kohya_training_resolution(file: str | Path) -> tuple[int, int] | None:
    """The (width, height) kohya's sd-scripts trained a LoRA at, from its ``ss_resolution`` header entry.

    Args:
        file: A LoRA .safetensors file.

    Returns:
        (width, height) in pixels, or None when the file does not record it (diffusers and peft
        files, or a kohya entry that cannot be read).
    """
    raw = lora_metadata(file).get("ss_resolution")
    numbers = [int(n) for n in re.findall(r"\d+", raw or "")]
    if len(numbers) == 1:
        numbers *= 2
    return (numbers[0], numbers[1]) if len(numbers) == 2 and min(numbers) > 0 else None


def _model_of(key: str) -> str | None:
    style = key_style(key)
    if style == "kohya":
        return next(m for p, m in KOHYA_MODELS.items() if key.startswith(p))
    if style == "peft":
        return "unet"
    return key.split(".", 1)[0] if style == "diffusers" else None


def lora_weight_elements(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """How many LoRA weight elements (down / up, A / B; not alphas) a state dict holds per model.

    Args:
        state: A LoRA state dict in any key style.

    Returns:
        Model ("unet", "text_encoder", "text_encoder_2") -> element count.
    """
    counts: dict[str, int] = {}
    for key, value in state.items():
        model = _model_of(key)
        if model is not None and key.endswith(LORA_WEIGHT_SUFFIXES):
            counts[model] = counts.get(model, 0) + value.numel()
    return counts


def layer_name(key: str) -> tuple[str | None, str]:
    """(model, layer name in kohya spelling without ``text_model_``) of a LoRA key of any style, to
    compare keys of different styles with the modules a model holds.

    Args:
        key: A LoRA weight key.

    Returns:
        The model (None for an unrecognised key) and e.g. ``down_blocks_0_attentions_0_proj_in``.
    """
    name = key
    for prefix in (p for prefixes in KEY_PREFIXES.values() for p in prefixes):
        if key.startswith(prefix):
            name = key[len(prefix):]
            break
    for suffix in LORA_WEIGHT_SUFFIXES + (".alpha",):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    name = name.replace(".processor.", ".")  # legacy attention-processor keys
    if name.endswith("to_out"):
        name += ".0"
    return _model_of(key), name.replace(".", "_").removeprefix("text_model_")
