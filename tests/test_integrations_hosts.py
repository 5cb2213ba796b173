"""Host-side helpers shared by the plugins (das_sd/integrations/hosts.py)."""

from __future__ import annotations

import re

import pytest
import torch

from das_sd.integrations.hosts import parse_prompt_loras, plain_prompt


@pytest.mark.parametrize("prompt, expected", [
    # A1111 / Forge / SD.Next: extra networks, (word:weight), [word], escaped literal brackets
    ("zorblat, a (red:1.3) circle <lora:demo:0.8>, [blue] background", "zorblat, a red circle, blue background"),
    ("((zorblat)), a (circle:0.5)", "zorblat, a circle"),
    (r"a \(literal\) sign", "a (literal) sign"),
    # compel (InvokeAI): (words)1.2, word++, word-
    ("(zorblat)1.2 a red++ circle, blue- background", "zorblat a red circle, blue background"),
    # plain text is left alone, hyphenated words and numbers included
    ("a red-green square, 3 dots", "a red-green square, 3 dots"),
    ("(a cat) 3 dogs", "a cat 3 dogs"),
])
def test_plain_prompt_removes_host_syntax_only(prompt, expected):
    assert plain_prompt(prompt) == expected


def test_prompt_loras_with_weights_and_lycoris_tags():
    text, loras = parse_prompt_loras("a <lora:style_a:0.7> cat <lyco:style_b> <hypernet:h:1>")
    assert text == "a cat" and [(l.name, l.weight) for l in loras] == [("style_a", 0.7), ("style_b", 1.0)]


def test_attributor_cache_keeps_the_most_recently_used_and_clears(monkeypatch, tmp_path):
    """Each Attributor holds a whole pipeline: at most max_entries stay loaded, least recently used
    dropped first; the same store folder (however spelled) and device gives the same one."""
    from das_sd.integrations import hosts

    loaded = []

    class FakeAttributor:
        def __init__(self, store, device=None):
            loaded.append((store, device))

    monkeypatch.setattr(hosts, "Attributor", FakeAttributor)
    cache = hosts.AttributorCache(max_entries=2)
    a = cache.get(tmp_path / "a")
    assert cache.get(str(tmp_path / "x" / ".." / "a")) is a and loaded == [(str(tmp_path / "a"), None)]
    b = cache.get(tmp_path / "b")
    assert cache.get(tmp_path / "a") is a  # b is now the least recently used
    c = cache.get(tmp_path / "a", "cpu")  # another device: another entry, b dropped
    assert len(cache) == 2 and cache.get(tmp_path / "a") is a and cache.get(tmp_path / "a", "cpu") is c
    assert cache.get(tmp_path / "b") is not b and len(loaded) == 4 and len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.get(tmp_path / "a") is not a
    assert hosts.CACHE.max_entries == 2
    with pytest.raises(ValueError, match="max_entries"):
        hosts.AttributorCache(max_entries=0)


# ---- SDXL: size conditioning and model families ------------------------------------------------

SDXL_PROMPT = "zorblat, a red circle on a blue background"


def test_size_conditioning_is_diffusers_time_ids():
    """(width, height) / (left, top) as the hosts name them -> the row diffusers' SDXL pipeline
    builds from (height, width) / (top, left)."""
    from sd_layouts import sdxl_pipeline

    from das_sd.conditioning import SizeConditioning

    pipe = sdxl_pipeline()
    projection = pipe.text_encoder_2.config.projection_dim
    for size, hw in [(SizeConditioning((24, 20), (2, 3), (16, 12)), ((20, 24), (3, 2), (12, 16))),
                     (SizeConditioning.plain((16, 32)), ((32, 16), (0, 0), (32, 16)))]:
        expected = pipe._get_add_time_ids(*hw, torch.float32, text_encoder_projection_dim=projection)[0]
        assert torch.equal(size.time_ids(), expected)
    with pytest.raises(ValueError, match="sizes must be positive"):
        SizeConditioning((0, 16), (0, 0), (16, 16)).time_ids()
    with pytest.raises(ValueError, match="not numbers"):
        SizeConditioning(("a", 16), (0, 0), (16, 16)).time_ids()


def test_attribute_pil_on_sdxl_uses_the_hosts_size_conditioning(sdxl_demo):
    """The host path equals attributing the same latent with the conditioning diffusers' SDXL
    pipeline computes (encode_prompt, _get_add_time_ids); the size conditioning changes the ranking
    scores, so dropping it would fail."""
    from das_sd.attribute import Attributor
    from das_sd.conditioning import SizeConditioning
    from das_sd.generation import GenerationSettings, generate
    from das_sd.integrations.hosts import attribute_pil
    from das_sd.latents import encode_prompts
    from sdxl_store import diffusers_conditioning

    attributor = Attributor(sdxl_demo["store"], device="cpu")
    image = generate(attributor.pipe, GenerationSettings(prompt=SDXL_PROMPT, seed=5)).images[0]
    size = SizeConditioning((24, 20), (2, 3), (16, 16))
    got = attribute_pil(attributor, image, f"<lora:x:1> {SDXL_PROMPT}", "das", 5, size=size)

    expected_cond = diffusers_conditioning(attributor.pipe, SDXL_PROMPT, (20, 24), (3, 2), (16, 16))
    ours = encode_prompts(attributor.pipe, [SDXL_PROMPT], time_ids=size.time_ids())
    # the same text encoders on the same token ids, one prompt each: the same float32 operations
    for field in ("hidden", "pooled", "time_ids"):
        torch.testing.assert_close(getattr(ours, field), getattr(expected_cond, field), rtol=0, atol=0)
    latents = attributor.encode_image(image)
    expected = attributor.attribute_latents(latents, [SDXL_PROMPT], "das", 5, cond=expected_cond)[0]
    assert [r.key for r in got.results] == [r.key for r in expected.results]
    assert [r.score for r in got.results] == [r.score for r in expected.results]
    plain = attribute_pil(attributor, image, SDXL_PROMPT, "das", 5)  # None: the image's size, uncropped
    native = attributor.attribute_latents(latents, [SDXL_PROMPT], "das", 5,
                                          cond=diffusers_conditioning(attributor.pipe, SDXL_PROMPT, (16, 16),
                                                                      (0, 0), (16, 16)))[0]
    assert [r.score for r in plain.results] == [r.score for r in native.results]
    assert [r.score for r in plain.results] != pytest.approx([r.score for r in got.results], rel=1e-3)


def test_families_of_host_files_and_the_refusal_names_the_store(sdxl_demo, tmp_path):
    from safetensors.torch import save_file

    from das_sd.attribute import Attributor
    from das_sd.integrations.families import (FamilyMismatch, checkpoint_family, lora_file_family,
                                              require_family, require_lora_families)

    one = torch.zeros(1)
    files = {  # key layouts: diffusers / kohya SD 1.x LoRAs (first transformer block only), SDXL ones
        "sd_diffusers": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "sd_kohya": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "xl_kohya_unet": "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight",
        "xl_kohya_te2": "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "conv_only": "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
    }
    for name, key in files.items():
        save_file({key: one}, tmp_path / f"{name}.safetensors")
    assert {n: lora_file_family(tmp_path / f"{n}.safetensors") for n in files} == {
        "sd_diffusers": "sd", "sd_kohya": "sd", "xl_kohya_unet": "sdxl", "xl_kohya_te2": "sdxl", "conv_only": None}
    assert lora_file_family(sdxl_demo["lora_file"]) == "sdxl"
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": one}, tmp_path / "xl.safetensors")
    save_file({"cond_stage_model.transformer.text_model.embeddings.position_ids": one}, tmp_path / "v15.safetensors")
    assert checkpoint_family(tmp_path / "xl.safetensors") == "sdxl" and checkpoint_family(tmp_path / "v15.safetensors") == "sd"
    (tmp_path / "broken.safetensors").write_bytes(b"\x10")
    with pytest.raises(ValueError, match="broken.safetensors"):
        checkpoint_family(tmp_path / "broken.safetensors")

    attributor = Attributor(sdxl_demo["store"], device="cpu")
    require_family(attributor, "sdxl", "the checkpoint")
    require_family(attributor, None, "the checkpoint")  # the host does not say: nothing to refuse
    store = str(sdxl_demo["store"])
    with pytest.raises(FamilyMismatch, match=f"store {re.escape(store)} was built for an SDXL model .*checkpoint 'v15' is SD 1.x"):
        require_family(attributor, "sd", "the checkpoint 'v15'")
    with pytest.raises(FamilyMismatch, match="'sd_kohya' .* is SD 1.x / 2.x"):
        require_lora_families(attributor, {"sd_kohya": tmp_path / "sd_kohya.safetensors",
                                           "x": tmp_path / "xl_kohya_te2.safetensors"})
