"""InvokeAI node: which LoRA training images made this image? (thin adapter over the das_sd API)

The image's metadata (written by InvokeAI's generation graphs) gives the prompt and the LoRAs. das-sd
loads the base model and LoRA that the store's manifest names: InvokeAI's own models are only used
to resolve the metadata's LoRA to a file, whose fingerprint is compared with the store's LoRA. A
generation whose main model or LoRA is of another family (the metadata's model "base": sd-1 / sd-2 /
sdxl, ...) than the store's is refused. SDXL generations are attributed with the size conditioning
InvokeAI's SDXL graphs use: original = target = the image's size, no crop.
"""

# No "from __future__ import annotations": InvokeAI reads the output class from invoke()'s return
# annotation object at start-up.
import os
from pathlib import Path
from typing import Literal

from invokeai.invocation_api import (
    BaseInvocation,
    BaseInvocationOutput,
    ImageField,
    InputField,
    InvocationContext,
    MetadataField,
    OutputField,
    WithBoard,
    invocation,
    invocation_output,
)
from das_sd.data.images import load_image
from das_sd.integrations.families import require_family, require_lora_families
from das_sd.integrations.hosts import CACHE, attribute_pil, attribution_json, lora_mismatch
from das_sd.registry import DEFAULT_METHOD, METHOD_NAMES

MethodName = Literal[METHOD_NAMES]
# InvokeAI's BaseModelType values -> das-sd's model families; other bases (flux, sd-3, ...) are named as they are
FAMILIES = {"sd-1": "sd", "sd-2": "sd", "sdxl": "sdxl"}
UNTOLD_BASES = ("any", "unknown")  # InvokeAI's bases that claim no family


@invocation_output("das_attribution_output")
class DASAttributionOutput(BaseInvocationOutput):
    """The top-k LoRA training images (saved to the gallery) and their scores as JSON."""

    collection: list[ImageField] = OutputField(description="The most influential training images, best first")
    scores_json: str = OutputField(description="JSON: store id, LoRA warning, ranked keys, paths, captions, shares, raw scores")


def metadata_dict(context: InvocationContext, image_name: str) -> dict:
    metadata = context.images.get_metadata(image_name)
    return dict(metadata.root) if metadata is not None else {}


def metadata_loras(context: InvocationContext, metadata: dict) -> tuple[list[str], dict[str, Path]]:
    """Names of the metadata's LoRAs and, for those installed in InvokeAI, their files."""
    names, files = [], {}
    for entry in metadata.get("loras") or []:
        if not isinstance(entry, dict):
            continue
        model = entry.get("model") or entry.get("lora") or {}
        name, key = model.get("name"), model.get("key")
        if not name:
            continue
        names.append(name)
        try:
            if key and context.models.exists(key):
                files[name] = Path(context.models.get_absolute_path(context.models.get_config(key)))
        except Exception as error:  # an unresolvable LoRA is reported by lora_mismatch, not fatal
            context.logger.warning(f"das-sd: could not resolve LoRA {name!r}: {error}")
    return names, files


def base_family(model: object) -> str | None:
    """The das-sd family of a metadata model entry's "base"; None when it has none or InvokeAI could
    not tell ("any", "unknown": its probe gives those to LoRAs it cannot place, e.g. small ones)."""
    base = model.get("base") if isinstance(model, dict) else None
    if not isinstance(base, str) or base in UNTOLD_BASES or not base:
        return None
    return FAMILIES.get(base, base)


def check_families(attributor, metadata: dict, files: dict[str, Path]) -> None:
    """Refuse a store of another family than the metadata's main model or LoRAs (FamilyMismatch)."""
    model = metadata.get("model")
    if isinstance(model, dict):
        require_family(attributor, base_family(model), f"the image's main model {model.get('name', '')!r}")
    for entry in metadata.get("loras") or []:
        lora = (entry.get("model") or entry.get("lora") or {}) if isinstance(entry, dict) else {}
        require_family(attributor, base_family(lora), f"the image's LoRA {lora.get('name', '')!r}")
    require_lora_families(attributor, files)


@invocation(
    "das_attribution",
    title="DAS Attribution",
    tags=["attribution", "lora", "das", "training data"],
    category="image",
    version="1.0.0",
    use_cache=False,  # the store on disk can change between runs
)
class DASAttributionInvocation(BaseInvocation, WithBoard):
    """Which LoRA training images made this image? Ranks a das-sd feature store's training images by
    the Diffusion Attribution Score and saves the top-k to the gallery."""

    image: ImageField = InputField(description="A generated image (its metadata gives prompt and LoRAs)")
    store_path: str = InputField(default=os.environ.get("DAS_SD_STORE", ""),
                                 description="das-sd feature store folder (built for the LoRA used)")
    prompt: str = InputField(default="", description="Prompt of the image; blank: read it from the image metadata")
    method: MethodName = InputField(default=DEFAULT_METHOD, description="Attribution method")
    top_k: int = InputField(default=8, ge=1, le=64, description="How many training images to return")
    device: Literal["auto", "cpu", "cuda"] = InputField(default="auto", description="Device das-sd runs on")

    def invoke(self, context: InvocationContext) -> DASAttributionOutput:
        if not self.store_path.strip():
            raise ValueError("DAS Attribution: set store_path to a das-sd feature store folder")
        metadata = metadata_dict(context, self.image.image_name)
        prompt = self.prompt.strip() or str(metadata.get("positive_prompt") or "").strip()
        if not prompt:
            raise ValueError(f"DAS Attribution: image {self.image.image_name} has no positive_prompt in its "
                             "metadata; type the prompt into the node's prompt field")

        context.util.signal_progress("das-sd: loading the store and its model")
        attributor = CACHE.get(self.store_path, None if self.device == "auto" else self.device)
        names, files = metadata_loras(context, metadata)
        check_families(attributor, metadata, files)
        warning = lora_mismatch(attributor, names, files)
        if warning:
            context.logger.warning(f"das-sd: {warning}")

        context.util.signal_progress("das-sd: attributing")
        image = context.images.get_pil(self.image.image_name, "RGB")
        result = attribute_pil(attributor, image, prompt, self.method, self.top_k,
                               {"image_name": self.image.image_name})
        for note in result.notes:  # e.g. a store that differentiates part of the LoRA (--allow-partial)
            context.logger.warning(f"das-sd: {note}")
        scores_json = attribution_json(attributor, [result], warning)

        saved = []
        for row in result.results:
            context.util.signal_progress(f"das-sd: saving training image {row.rank}/{len(result.results)}")
            dto = context.images.save(load_image(row.path), metadata=MetadataField({
                "das_sd": {"query_image": self.image.image_name, "method": self.method, "rank": row.rank,
                           "key": row.key, "path": row.path, "caption": row.caption, "share": row.share,
                           "score": row.score, "sign": row.sign, "store_id": attributor.store.store_id}}))
            saved.append(ImageField(image_name=dto.image_name))
        return DASAttributionOutput(collection=saved, scores_json=scores_json)
