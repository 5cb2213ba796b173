"""What every generation-host plugin (webui extension, ComfyUI and InvokeAI nodes) shares.

Hosts hand over PIL images or tensors, prompts with ``<lora:name:weight>`` tags and model names; the
plugins turn them into das_sd calls through these helpers and hold no attribution logic of their own.
Host models are never touched: the store's manifest names the base and LoRA that das_sd loads.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..attribute import Attributor
from ..attribute_results import Attribution
from ..conditioning import SizeConditioning
from .families import store_family
from ..latents import encode_prompts
from ..models.fingerprint import lora_fingerprint
from ..registry import DEFAULT_METHOD
from ..shares import share_text

# The webui family's extra-network syntax: <lora:name:weight>, <lyco:...>, <hypernet:...>
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class PromptLora:
    """A LoRA named in a host prompt by a ``<lora:name:weight>`` (or ``<lyco:...>``) tag.

    Attributes:
        name: The LoRA's name as the host knows it.
        weight: Its weight in the tag (1.0 when absent or unreadable).
    """

    name: str
    weight: float


def parse_prompt_loras(prompt: str) -> tuple[str, list[PromptLora]]:
    """Split a host prompt into its text and the LoRAs its extra-network tags name.

    Args:
        prompt: A webui-style prompt, possibly with ``<lora:name:weight>`` / ``<lyco:...>`` /
            ``<hypernet:...>`` tags.

    Returns:
        (prompt without any extra-network tags, the ``lora`` and ``lyco`` tags in order).
    """
    loras = []
    for kind, args in EXTRA_NETWORK.findall(prompt):
        if kind.lower() not in ("lora", "lyco"):
            continue
        items = args.split(":")
        try:
            weight = float(items[1]) if len(items) > 1 and "=" not in items[1] else 1.0
        except ValueError:
            weight = 1.0
        loras.append(PromptLora(items[0].strip(), weight))
    clean = re.sub(r"\s{2,}", " ", EXTRA_NETWORK.sub("", prompt)).strip(" ,")
    return clean, loras


# Prompt-weighting syntax of the hosts: A1111 "(word:1.2)", "[word]", "\(literal\)";
# compel (InvokeAI) "(word)1.2", "word++", "word-". The store's text encoder saw plain captions.
_A1111_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*\)")
_COMPEL_WEIGHT = re.compile(r"\)-?\d+(?:\.\d+)?")
_COMPEL_PLUS_MINUS = re.compile(r"(?<=[\w)])[+-]+(?=[\s,.]|$)")
_BRACKETS = re.compile(r"(?<!\\)[()\[\]]")


def plain_prompt(prompt: str) -> str:
    """A host prompt as plain text: extra-network tags and attention-weight syntax removed.

    Args:
        prompt: A host prompt (A1111 ``(word:1.2)``, ``[word]``, ``\\(literal\\)``; compel ``(word)1.2``,
            ``word++``, ``word-``).

    Returns:
        The text the store's text encoder saw in training captions: weights and brackets removed,
        escaped brackets kept as brackets.
    """
    text, _ = parse_prompt_loras(prompt)
    text = _A1111_WEIGHT.sub(")", text)
    text = _COMPEL_WEIGHT.sub(")", text)
    text = _COMPEL_PLUS_MINUS.sub("", text)
    text = _BRACKETS.sub("", text).replace("\\(", "(").replace("\\)", ")")
    text = text.replace("\\[", "[").replace("\\]", "]")
    return re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", text)).strip(" ,")


class AttributorCache:
    """The Attributors of the most recently used (store folder, device) pairs, kept between a host's
    calls (loading one is the slow part). Each holds a whole pipeline (GBs for SD 1.x), so at most
    ``max_entries`` are kept: the least recently used one is dropped when another is loaded, and its
    memory is freed once no caller holds it. ``clear()`` drops them all.

    Args:
        max_entries: How many Attributors to keep (at least 1; default 2).

    Raises:
        ValueError: When ``max_entries`` is below 1.
    """

    def __init__(self, max_entries: int = 2):
        if max_entries < 1:
            raise ValueError(f"AttributorCache: max_entries must be >= 1, not {max_entries}")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str | None], Attributor] = OrderedDict()

    def get(self, store: str | Path, device: str | None = None) -> Attributor:
        """The Attributor of a store on a device, loaded (with the store's base + LoRA) if not cached.

        Args:
            store: The feature store folder; its resolved path is the cache key.
            device: Torch device for the pipeline; None: cuda when available.

        Returns:
            The cached or newly loaded Attributor, now the most recently used.
        """
        key = (str(Path(store).expanduser().resolve()), device)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            attributor = Attributor(key[0], device=device)
            self._cache[key] = attributor
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            return attributor

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Drop every cached Attributor (memory is freed once no caller holds them)."""
        with self._lock:
            self._cache.clear()


CACHE = AttributorCache()


def attribute_pil(attributor: Attributor, image: Image.Image, prompt: str, method: str = DEFAULT_METHOD,
                  top_k: int = 8, info: dict | None = None, size: SizeConditioning | None = None) -> Attribution:
    """Attribute a host's PIL image with its prompt (as plain text: the text encoder of the store's
    pipeline never saw extra-network tags or weighting syntax).

    Args:
        attributor: The store's Attributor (``CACHE.get(store)``).
        image: The generated image, at the store's resolution (else a QueryError).
        prompt: The host prompt it was generated with.
        method: Attribution method name (das_sd.registry's ``METHOD_NAMES``).
        top_k: Training images to return.
        info: Query metadata recorded with the attribution.
        size: SDXL stores: the size conditioning the host generated with; None: the image's own
            size, uncropped (``SizeConditioning.plain``). SD stores have none and ignore it.

    Returns:
        The image's top-``top_k`` training images with their scores.
    """
    text = plain_prompt(prompt)
    latents = attributor.encode_image(image.convert("RGB"), "image")
    cond = None
    if size is not None and store_family(attributor) == "sdxl":
        cond = encode_prompts(attributor.pipe, [text], time_ids=size.time_ids())
    return attributor.attribute_latents(latents, [text], method, top_k, [info or {}], cond=cond)[0]


def lora_mismatch(attributor: Attributor, names: list[str], lora_files: dict[str, Path]) -> str | None:
    """A message when the LoRAs named in a prompt are not the store's LoRA, else None.

    Args:
        attributor: The store's Attributor.
        names: The LoRA names of the generation (from its prompt or the host's loader nodes).
        lora_files: The host's LoRA names -> files; names it cannot resolve are reported.

    Returns:
        None when one of ``names`` has the store's LoRA fingerprint; else a sentence for the user
        (no LoRA named, a name not found, or none of them the store's).
    """
    expected = attributor.store.identity["lora_fingerprint"]
    if not names:
        return "the generation names no LoRA; the store attributes " + Path(attributor.lora_path).name
    for name in names:
        path = lora_files.get(name)
        if path is None:
            return f"LoRA {name!r} of the generation was not found among the host's LoRA files"
        if lora_fingerprint(path) == expected:
            return None
    return (f"none of the generation's LoRAs ({', '.join(names)}) is the store's LoRA "
            f"({Path(attributor.lora_path).name}); attributions refer to the store's LoRA")


def attribution_json(attributor: Attributor, results: list[Attribution], warning: str | None) -> str:
    """The JSON string the node hosts output: store id, LoRA warning and one attribution per image.

    Args:
        attributor: The store's Attributor (for its store id).
        results: One attribution per image.
        warning: The ``lora_mismatch`` message, or None.

    Returns:
        JSON text with "store_id", "warning" and "attributions" (``Attribution.to_json()`` each).
    """
    return json.dumps({"store_id": attributor.store.store_id, "warning": warning,
                       "attributions": [r.to_json() for r in results]})


def infotext_value(result: Attribution, n: int = 3) -> str:
    """Short infotext entry: the top-n training files with their shares of the influence.

    Args:
        result: The image's attribution.
        n: How many training files to list.

    Returns:
        "file (23.4%); file (8.1%); ...": file names only, each with its share of the image's positive
        influence (``das_sd.shares``; the raw scores are in the attribution JSON).
    """
    return "; ".join(f"{Path(r.path).name} ({share_text(r.share, r.score, r.sign)})" for r in result.results[:n])


def captioned(result: Attribution) -> list[tuple[str, str]]:
    """(image path, caption) pairs for a gallery (hosts' and the app's).

    Args:
        result: The attribution.

    Returns:
        One (training image path, "#rank · share · caption") pair per result, best first
        (``AttributionRow.label``).
    """
    return [(r.path, r.label()) for r in result.results]
