"""The diffusers integration on the embedded model and the demo store, through diffusers' own loaders."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import StableDiffusionPipeline

from das_sd.attribute import Attributor
from das_sd.generation import GenerationSettings, generate
from das_sd.integrations.diffusers import AttributingPipeline
from das_sd.png_metadata import read_png_attribution, read_png_metadata
from das_sd.registry import DEFAULT_METHOD
from das_sd.store import StoreError
from helpers import random_lora
from tolerances import sampler_atol

PROMPT = "drelkin, a white circle on a purple background"


def diffusers_pipe(base, lora=None):
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


@pytest.fixture(scope="module")
def attributing(demo):
    return AttributingPipeline(diffusers_pipe(demo["base"], demo["lora"]), demo["store"], top_k=5)


def test_each_generated_image_is_attributed_from_its_final_latents(attributing, demo, tmp_path):
    generator = [torch.Generator().manual_seed(s) for s in (7, 8)]
    out = attributing(PROMPT, num_inference_steps=25, guidance_scale=4.0, num_images_per_prompt=2,
                      generator=generator)
    assert len(out.images) == len(out.attributions) == 2
    # independent expectation: das-sd's own generate (same seeds) + the API, prompt encoded anew
    reference = Attributor(demo["store"], device="cpu")
    for i, seed in enumerate((7, 8)):
        ours = generate(reference.pipe, GenerationSettings(prompt=PROMPT, seed=seed))
        torch.testing.assert_close(out.latents[i:i + 1], ours.latents, atol=sampler_atol(25, 4.0), rtol=0)
        # the pipeline's own latents, attributed alone: its features (a batch of 2) differ by float32
        # rounding, at most A u = 1e4 * 6e-8 relative (tests/tolerances.py), so the squared scores by 1.2e-3
        expected = reference.attribute_latents(out.latents[i:i + 1], [PROMPT], DEFAULT_METHOD, 5)[0]
        assert [r.key for r in out.attributions[i].results] == [r.key for r in expected.results]
        assert [r.score for r in out.attributions[i].results] == pytest.approx([r.score for r in expected.results],
                                                                              rel=2e-3)
    paths = attributing.save(out, tmp_path)
    for path, attribution in zip(paths, out.attributions):
        record = read_png_attribution(path)
        assert record["store_id"] == attributing.store_id and record["method"] == DEFAULT_METHOD
        assert [r["key"] for r in record["top_k"]] == [r.key for r in attribution.results]
        # both numbers: the share (6 decimals) and the raw score (6 significant digits, so that a
        # das score of 6.663e-06 is not rounded to 7e-06)
        assert [r["share"] for r in record["top_k"]] == pytest.approx([r.share for r in attribution.results],
                                                                       abs=5e-7)
        assert [r["score"] for r in record["top_k"]] == pytest.approx([r.score for r in attribution.results],
                                                                       rel=5e-6)
        assert read_png_metadata(path)["prompt"] == PROMPT


def test_numpy_output_and_prompt_embeds_work(attributing):
    pipe = attributing.pipe
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    out = attributing(None, prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=4,
                      output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images[0].shape == (32, 32, 3) and len(out.attributions[0].results) == 5
    by_text = attributing(PROMPT, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
    # same conditioning, same latents: same ranking (the prompt text only names the query)
    torch.testing.assert_close(out.latents, by_text.latents)
    assert [r.key for r in out.attributions[0].results] == [r.key for r in by_text.attributions[0].results]


def test_a_pipeline_the_store_was_not_built_for_is_refused(demo):
    with pytest.raises(StoreError, match="LoRA is not the one"):
        AttributingPipeline(diffusers_pipe(demo["base"]), demo["store"])  # no LoRA loaded
    other = diffusers_pipe(demo["base"])
    other.load_lora_weights(random_lora(other, rank=8, seed=3))
    with pytest.raises(StoreError, match="LoRA is not the one"):
        AttributingPipeline(other, demo["store"])
    changed = diffusers_pipe(demo["base"], demo["lora"])
    with torch.no_grad():
        changed.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight.mul_(1.5)
    with pytest.raises(StoreError, match="base model is not the one"):
        AttributingPipeline(changed, demo["store"])


def test_an_unknown_method_is_refused_naming_the_choices(attributing, demo):
    with pytest.raises(ValueError, match="unknown method 'nope'; expected one of das, das-signed"):
        AttributingPipeline(attributing.pipe, demo["store"], method="nope")


# ---- SDXL ----------------------------------------------------------------------------------------

SDXL_PROMPT = "zorblat, a red circle on a blue background"


def diffusers_sdxl_pipe(sdxl_demo, lora: bool = True):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_demo["base"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(str(sdxl_demo["lora"]))
    return pipe


def test_an_sdxl_pipeline_is_attributed_with_the_conditioning_it_used(sdxl_demo):
    """A StableDiffusionXLPipeline with micro-conditioning set: the attribution equals the
    Attributor's on the same final latents with the conditioning diffusers computes for those
    arguments (encode_prompt, _get_add_time_ids); with the default size conditioning instead, the
    scores differ, so a wrapper that dropped it would fail."""
    from sdxl_store import diffusers_conditioning

    pipe = diffusers_sdxl_pipe(sdxl_demo)
    das = AttributingPipeline(pipe, sdxl_demo["store"], top_k=5)
    micro = dict(original_size=(20, 24), crops_coords_top_left=(3, 2), target_size=(16, 16))
    out = das(SDXL_PROMPT, num_inference_steps=3, guidance_scale=4.0, num_images_per_prompt=2,
              generator=torch.Generator().manual_seed(1), **micro)
    assert len(out.images) == len(out.attributions) == 2 and out.latents.shape == (2, 4, 8, 8)

    reference = Attributor(sdxl_demo["store"], device="cpu")
    cond = diffusers_conditioning(reference.pipe, SDXL_PROMPT, (20, 24), (3, 2), (16, 16))
    default = diffusers_conditioning(reference.pipe, SDXL_PROMPT, (16, 16), (0, 0), (16, 16))
    for i in range(2):
        expected = reference.attribute_latents(out.latents[i:i + 1], [SDXL_PROMPT], DEFAULT_METHOD, 5, cond=cond)[0]
        # one image alone vs a batch of two: float32 rounding of the features, at most A u = 1e4 * 6e-8
        # relative (tests/tolerances.py), so the squared scores within 1.2e-3
        assert [r.key for r in out.attributions[i].results] == [r.key for r in expected.results]
        got = [r.score for r in out.attributions[i].results]
        assert got == pytest.approx([r.score for r in expected.results], rel=2e-3)
        plain = reference.attribute_latents(out.latents[i:i + 1], [SDXL_PROMPT], DEFAULT_METHOD, 5, cond=default)[0]
        assert {r.key: r.score for r in plain.results} != pytest.approx(
            {r.key: r.score for r in expected.results}, rel=2e-2)


def test_a_pipeline_of_another_family_is_refused_naming_the_store(sdxl_demo, base_path):
    from das_sd.models.loading import load_pipeline

    store = str(sdxl_demo["store"])
    with pytest.raises(StoreError, match=f"{re.escape(store)}: the store was built for an SDXL model, but the "
                                         "pipeline is SD 1.x / 2.x"):
        AttributingPipeline(load_pipeline(base_path, device="cpu"), store)
    with pytest.raises(StoreError, match="LoRA is not the one"):  # the right family, no LoRA loaded
        AttributingPipeline(diffusers_sdxl_pipe(sdxl_demo, lora=False), store)
