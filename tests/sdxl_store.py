"""An SDXL-layout store for the integration tests: ``sd_layouts.sdxl_pipeline`` saved as a diffusers
folder, a small diffusers-format LoRA trained on a few demo images by ``das-sd train-lora`` (UNet and
both text encoders), featurized and indexed by the CLI as a user would."""

from __future__ import annotations

from pathlib import Path

from das_sd.cli import main
from das_sd.toy.demo_data import DemoConfig, make_demo_data
from das_sd.toy.tiny_sd import write_portable_text_encoder
from sd_layouts import save_pipeline, sdxl_pipeline

RESOLUTION = 16  # the SDXL layout's native size: sample_size 8 times the VAE's factor 2


def build_sdxl_store(root: Path, text_widths: tuple[int, int] = (32, 32), kohya: bool = False) -> dict:
    """Build (once per ``root``) the SDXL base folder, LoRA, dataset and store.

    Args:
        root: An empty folder.
        text_widths: The text encoders' widths; SDXL's own (768, 1280) give the UNet SDXL's
            cross-attention width 2048, by which hosts such as InvokeAI recognise an SDXL model.
        kohya: Export the trained LoRA to kohya's SDXL naming (``das-sd export-lora --to kohya``, a
            single file as sd-scripts writes it) and featurize that file instead.

    Returns:
        {"base", "lora", "data", "store"}: their paths (the LoRA's weights file under "lora_file").
    """
    base = save_pipeline(sdxl_pipeline(text_widths=text_widths), root / "sdxl-base")
    for encoder in ("text_encoder", "text_encoder_2"):  # readable by older transformers too (InvokeAI's 5.5)
        write_portable_text_encoder(base / encoder)
    data = make_demo_data(root / "data", DemoConfig(images_per_style=1, exemplars_per_group=1))
    lora, store = root / "lora", root / "store"
    assert main(["train-lora", "--base", str(base), "--data", str(data), "--out", str(lora), "--steps", "5",
                 "--resolution", str(RESOLUTION), "--text-encoder-rank", "2"]) == 0
    if kohya:
        exported = root / "sdxl_style_kohya.safetensors"
        assert main(["export-lora", "--lora", str(lora), "--to", "kohya", "--out", str(exported),
                     "--base", str(base)]) == 0
        lora = exported
    assert main(["featurize", "--base", str(base), "--lora", str(lora), "--data", str(data), "--store", str(store),
                 "--timesteps", "2", "--dim", "64"]) == 0
    assert main(["index", "--store", str(store)]) == 0
    lora_file = lora if lora.is_file() else next(lora.rglob("*.safetensors"))
    return {"base": base, "lora": lora, "lora_file": lora_file, "data": data, "store": store}


def diffusers_conditioning(pipe, prompt: str, original_hw: tuple[int, int], crop_tl: tuple[int, int],
                           target_hw: tuple[int, int]):
    """The conditioning diffusers' own StableDiffusionXLPipeline computes for one prompt (its
    ``encode_prompt``, no guidance) and size conditioning (its ``_get_add_time_ids``), in its own
    (height, width) / (top, left) order: the independent expectation of das-sd's."""
    from das_sd.conditioning import Conditioning

    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.unet.device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids(tuple(original_hw), tuple(crop_tl), tuple(target_hw), embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return Conditioning(embeds.float(), pooled.float(), time_ids.float())
