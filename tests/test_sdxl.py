"""SDXL: das-sd conditions an SDXL-layout UNet exactly as diffusers' SDXL pipeline does (both text
encoders, pooled embedding, size conditioning), its per-row gradients equal a plain autograd loop on
that conditioning, SDXL folders and LoRAs (UNet + both text encoders) load, and a store records its
model family and refuses a pipeline of the other one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from das_sd.conditioning import Conditioning, model_family, size_time_ids, unet_kwargs
from das_sd.featurize.gradients import per_row_gradients
from das_sd.featurize.lora_layers import lora_parameters
from das_sd.featurize.settings import output_function
from das_sd.latents import encode_prompts, native_time_ids
from das_sd.models.errors import ModelError
from das_sd.models.loading import load_lora, load_pipeline
from das_sd.noising import noisy_latents
from sd_layouts import ATTENTION, add_random_lora, save_pipeline, sd_pipeline, sdxl_pipeline
from tolerances import ALGEBRAIC_RTOL, relative_error

PROMPTS = ["zorblat, a red circle on a blue background", "a green square", ""]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_pipeline(sdxl_pipeline(), tmp_path_factory.mktemp("sdxl") / "pipe")


def test_prompt_conditioning_equals_diffusers_sdxl_pipeline():
    pipe = sdxl_pipeline()
    assert model_family(pipe) == "sdxl" and model_family(sd_pipeline()) == "sd"
    cond = encode_prompts(pipe, PROMPTS)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    # the same modules on the same ids in the same order: equal to the bit
    assert torch.equal(cond.hidden, embeds.float()) and torch.equal(cond.pooled, pooled.float())
    expected = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(native_time_ids(pipe), expected[0])
    assert torch.equal(cond.time_ids, expected.expand(3, 6))


def test_size_conditioning_of_cropped_training_images():
    # hand-worked: a 48x32 (w x h) image covers 32x32 at scale 1, 8 px cut on each side (crop left 8);
    # a 20x40 image covers 16x16 at scale 0.8 -> 16x32, crop top (32 - 16) / 2 = 8
    got = size_time_ids([(48, 32), (20, 40), (16, 16)], (32, 32))
    assert got.tolist()[0] == [32, 48, 0, 8, 32, 32]
    assert size_time_ids([(20, 40)], (16, 16)).tolist() == [[40, 20, 8, 0, 16, 16]]
    assert got.tolist()[2] == [16, 16, 0, 0, 32, 32]  # upscaled, no crop
    # a bucket (w, h) = (40, 24): target height first, as SDXL's trainers record it
    assert size_time_ids([(80, 40)], (40, 24)).tolist() == [[40, 80, 0, 4, 24, 40]]


def test_conditioning_indexes_moves_and_repeats_like_rows():
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(3, 4, 8, generator=g), torch.randn(3, 5, generator=g), torch.rand(3, 6, generator=g))
    assert len(cond) == 3 and cond.shape == (3, 4, 8)
    assert torch.equal(cond[[2, 0]].pooled, cond.pooled[[2, 0]]) and len(cond[1]) == 1
    rep = cond.repeat_interleave(2)
    assert torch.equal(rep.time_ids, cond.time_ids.repeat_interleave(2, dim=0))
    assert torch.equal(Conditioning.cat([cond[:1], cond[1:]]).hidden, cond.hidden)
    kwargs = unet_kwargs(cond.to(torch.float64), torch.float32)
    assert kwargs["encoder_hidden_states"].dtype == torch.float32
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    with pytest.raises(ValueError, match="rows"):
        cond.repeat_interleave(2, dim=1)


@pytest.mark.numerics
@pytest.mark.parametrize("output", ["l1", "loss"])
def test_sdxl_per_row_gradients_equal_autograd_on_diffusers_conditioning(output):
    pipe = sdxl_pipeline()
    add_random_lora(pipe.unet, ATTENTION + ["proj_in", "proj_out", "conv1", "conv2"], rank=2, seed=3,
                    dtype=torch.float64)
    pipe.text_encoder.to(torch.float64)
    pipe.text_encoder_2.to(torch.float64)
    unet = pipe.unet.eval()
    prompts = PROMPTS[:2]
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 700])
    alphas = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
    # a training image of 48 x 32 px center-cropped to the 64 px square (the model's latents are 8 x 8)
    time_ids = size_time_ids([(48, 32), (64, 64)], (64, 64)).double()
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    # das-sd's encoding equals diffusers' (test above) but is float32: float64 inputs for an algebraic check
    cond = Conditioning(embeds, pooled, time_ids)
    batched = per_row_gradients(unet, x0, noise, t, cond, alphas, output)
    params = lora_parameters(unet)
    for i in range(2):
        added = {"text_embeds": pooled[i:i + 1], "time_ids": time_ids[i:i + 1]}
        xt = noisy_latents(x0[i:i + 1], noise[i:i + 1], t[i:i + 1], alphas)
        pred = unet(xt, t[i:i + 1], encoder_hidden_states=embeds[i:i + 1], added_cond_kwargs=added).sample
        value = output_function(output, pred, noise[i:i + 1]).sum()
        reference = torch.cat([grad.reshape(-1) for grad in torch.autograd.grad(value, params)])
        assert relative_error(batched[i], reference) < ALGEBRAIC_RTOL, (output, i)
    # the size conditioning reaches the gradients: another crop gives others
    shifted = per_row_gradients(unet, x0[:1], noise[:1], t[:1], cond[0].with_time_ids(
        size_time_ids([(64, 64)], (64, 64)).double()), alphas, output)
    assert relative_error(shifted[0], batched[0]) > 1e-6


def test_sdxl_folder_loads_and_other_pipelines_are_refused(sdxl_folder, tmp_path):
    pipe = load_pipeline(sdxl_folder, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and model_family(pipe) == "sdxl"
    original = sdxl_pipeline()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(original, ["a red circle"])
    with torch.no_grad():
        a = original.unet(x, torch.tensor([500]), **unet_kwargs(cond, torch.float32)).sample
        b = pipe.unet(x, torch.tensor([500]), **unet_kwargs(encode_prompts(pipe, ["a red circle"]), torch.float32)).sample
    assert torch.equal(a, b)
    other = shutil.copytree(sdxl_folder, tmp_path / "refiner")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(ModelError, match="StableDiffusionXLImg2ImgPipeline.*SDXL"):
        load_pipeline(other, device="cpu")


def _dataset(root):
    from das_sd.data.datasets import open_dataset

    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, color in enumerate(colors):
        Image.new("RGB", (24 + 8 * i, 16 + 4 * i), color).save(images / f"{i}.png")
        rows.append({"file_name": f"images/{i}.png", "text": f"zorblat, a plain picture number {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return open_dataset(root)


def test_sdxl_lora_trains_saves_loads_and_its_store_refuses_sd(sdxl_folder, tmp_path):
    from das_sd.attribute import Attributor
    from das_sd.featurize.service import build_store
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.store import StoreError
    from das_sd.lora_record import LoraRecipe
    from das_sd.train import train_lora

    dataset = _dataset(tmp_path / "data")
    pipe = load_pipeline(sdxl_folder, device="cpu")
    recipe = LoraRecipe(rank=2, steps=3, batch_size=2, resolution=16, text_encoder_rank=2)
    train_lora(sdxl_folder, dataset, tmp_path / "lora", recipe, progress=False, pipe=pipe, keep_adapter=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as fh:
        parts = {k.split(".")[0] for k in fh.keys()}
    assert parts == {"unet", "text_encoder", "text_encoder_2"}
    # the file reproduces the trained model: UNet and both text encoders
    loaded = load_pipeline(sdxl_folder, device="cpu")
    load_lora(loaded, tmp_path / "lora")
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = loaded.unet(x, torch.tensor([300]), **unet_kwargs(encode_prompts(loaded, ["zorblat"]), torch.float32))
        want = pipe.unet(x, torch.tensor([300]), **unet_kwargs(encode_prompts(pipe, ["zorblat"]), torch.float32))
    # same modules and weights; the loaded LoRA runs as peft layers like the trained ones
    torch.testing.assert_close(got.sample, want.sample, rtol=1e-5, atol=1e-6)

    settings = {"das": FeaturizerSettings(num_timesteps=2, projection_dim=64)}
    store = build_store(dataset, tmp_path / "store", sdxl_folder, tmp_path / "lora" / "pytorch_lora_weights.safetensors",
                        settings, pipe=loaded, progress=False)
    assert store.identity["model_family"] == "sdxl" and len(store) == 4
    with pytest.raises(StoreError, match="built for an SDXL model, but the pipeline is SD 1.x / 2.x"):
        Attributor(store, pipe=sd_pipeline(), check_fingerprints=False)
    attributor = Attributor(store, pipe=loaded, check_fingerprints=False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))  # the store is at 64 px
    result = attributor.attribute_latents(latents, ["zorblat"], top_k=3)[0]
    assert len(result.results) == 3


def test_sdxl_text_encoder_2_lora_refused_on_sd_pipeline(tmp_path):
    from das_sd.lora_record import LORA_WEIGHT_NAME
    from safetensors.torch import save_file

    pipe = sd_pipeline()
    state = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
             "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2)}
    save_file(state, str(tmp_path / LORA_WEIGHT_NAME))
    with pytest.raises(ModelError, match=LORA_WEIGHT_NAME):
        load_lora(pipe, tmp_path / LORA_WEIGHT_NAME)
