"""Single-file SDXL base checkpoints (A1111 / ComfyUI .safetensors in Stability's SGM key layout) load offline:
the same weights, bit for bit, and UNet, VAE and both text encoders' outputs as the diffusers pipeline
they were written from (by tests/sgm_layout.py's hand-typed table, not diffusers' conversion); a full-size
SDXL header (a sparse file) picks the shipped SDXL configs, whose models diffusers fills completely;
refiners and incomplete files are refused naming the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from das_sd.models import single_file
from das_sd.models.loading import ModelError, load_pipeline, resolve_base
from das_sd.models.single_file_configs import shipped_config
from sd_layouts import sdxl_pipeline
from sgm_layout import open_clip_bigg, sdxl_pipeline_to_sgm, sgm_name
from test_single_file import _sparse_safetensors, no_hub  # noqa: F401  (the fixture)
from tolerances import FLOAT32_FORWARD_ATOL, FLOAT32_FORWARD_RTOL

pytestmark = pytest.mark.numerics

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The SDXL-layout pipeline (text encoders 32 and 48 wide, as SDXL's differ: 768 and 1280), its
    single file and its config folder (the reduced widths' configs and tokenizers, no weights)."""
    root = tmp_path_factory.mktemp("sdxl-single")
    pipe = sdxl_pipeline(seed=3, text_widths=(32, 48))
    file = root / "sdxl-model.safetensors"
    save_file(sdxl_pipeline_to_sgm(pipe), str(file), metadata={"format": "pt"})
    config = root / "config"
    pipe.save_config(config)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(config / name)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).config.save_pretrained(config / name)
    for name in ("tokenizer", "tokenizer_2"):
        getattr(pipe, name).save_pretrained(config / name)
    assert not list(config.rglob("*.safetensors"))
    return {"pipe": pipe, "file": file, "config": config}


def _outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet (with SDXL's pooled text and size conditioning), VAE and both text encoders' outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    prompts = ["a red circle, striped style", "a green square"]
    ids = [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    with torch.no_grad():
        first = pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        second = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)
        eps = pipe.unet(x, torch.tensor([10, 700]), encoder_hidden_states=torch.cat([first, second.hidden_states[-2]], -1),
                        added_cond_kwargs={"text_embeds": second.text_embeds, "time_ids": time_ids}).sample
        return {"text_encoder": first, "text_encoder_2": second.hidden_states[-2], "pooled": second.text_embeds,
                "unet": eps, "vae_encode": pipe.vae.encode(image).latent_dist.mean, "vae_decode": pipe.vae.decode(x).sample}


def test_sdxl_single_file_loads_to_the_outputs_of_the_pipeline_it_was_written_from(checkpoint, monkeypatch, no_hub):
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setenv(single_file.CONFIG_ENV, str(checkpoint["config"]))
    assert resolve_base(checkpoint["file"]) == checkpoint["file"]
    assert single_file.detect_family(single_file.read_header(checkpoint["file"])[0]) == "sdxl"
    loaded = load_pipeline(checkpoint["file"], device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline)
    assert loaded.scheduler.config.prediction_type == "epsilon"  # SDXL base's; no metadata says otherwise
    for name in MODELS:  # the same weights, bit for bit, through diffusers' own SGM -> diffusers conversion
        original, got = getattr(checkpoint["pipe"], name).state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == original.keys(), name
        assert all(torch.equal(t, original[k]) for k, t in got.items()), name
    expected, got = _outputs(checkpoint["pipe"]), _outputs(loaded)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=FLOAT32_FORWARD_RTOL, atol=FLOAT32_FORWARD_ATOL), name


def test_one_tokenizer_folder_serves_both_and_the_second_pads_as_sdxls(checkpoint, monkeypatch, no_hub):
    """A plain tokenizer folder (not a pipeline's) for an SDXL file: the first tokenizer as it is, the
    second padding with "!" as SDXL's OpenCLIP tokenizer does; a config folder's tokenizer_2/ as it is."""
    monkeypatch.delenv(single_file.CONFIG_ENV, raising=False)
    plain = single_file.load_single_file(checkpoint["file"], device="cpu", config=checkpoint["config"],
                                         tokenizer=checkpoint["config"] / "tokenizer")
    assert plain.tokenizer.pad_token == "<|endoftext|>" and plain.tokenizer_2.pad_token == "!"
    folder = single_file.load_single_file(checkpoint["file"], device="cpu", config=checkpoint["config"])
    assert folder.tokenizer_2.pad_token == checkpoint["pipe"].tokenizer_2.pad_token == "<|endoftext|>"


def test_a_missing_text_encoder_2_weight_is_refused_not_left_random(checkpoint, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    state = load_file(str(checkpoint["file"]))
    del state["conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc.weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    monkeypatch.setenv(single_file.CONFIG_ENV, str(checkpoint["config"]))
    with pytest.raises(ModelError, match=r"cut\.safetensors: .*text.encoder"):
        load_pipeline(tmp_path / "cut.safetensors", device="cpu")


def _full_size_sdxl_shapes() -> dict:
    """The SGM key names and shapes of a full-size SDXL base (models built on the meta device from the shipped configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm_layout import vae_to_ldm

    folder = shipped_config("sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        first = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        second = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        state = {"model.diffusion_model." + sgm_name(k): v for k, v in unet.state_dict().items()}
        state.update(vae_to_ldm(vae.state_dict()))
        state.update({"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                      for k, v in first.state_dict().items()})
        state.update(open_clip_bigg(second.state_dict(), "conditioner.embedders.1.model."))
    return {k: list(v.shape) for k, v in state.items()}


def test_a_full_size_sdxl_header_picks_the_shipped_sdxl_configs(tmp_path, monkeypatch):
    monkeypatch.delenv(single_file.PREDICTION_ENV, raising=False)
    shapes = _full_size_sdxl_shapes()
    file = _sparse_safetensors(tmp_path / "sd_xl_base_1.0.safetensors", shapes)
    assert file.stat().st_size > 6e9 and file.stat().st_blocks * 512 < 1e7  # sparse: nothing of size on disk
    assert resolve_base(file) == file
    header = single_file.read_header(file)[0]
    assert header["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == [640, 2048]
    assert header["conditioner.embedders.1.model.text_projection"] == [1280, 1280]
    assert single_file.detect_family(header) == "sdxl"
    assert single_file.resolve_prediction_type(file, "sdxl") == "epsilon"
    assert single_file.config_folder(file, "sdxl", "epsilon") == shipped_config("sdxl")
    # diffusers' own renaming of the header gives every UNet and VAE weight the shipped configs build
    assert single_file._missing_weights(file, shipped_config("sdxl")) is None
    assert "the unet's weights" in single_file._missing_weights(file, shipped_config("sd1"))
    # a v-prediction fine-tune says so with kohya's / ComfyUI's marker key
    vpred = _sparse_safetensors(tmp_path / "vpred.safetensors", {**shapes, "v_pred": []})
    assert single_file.resolve_prediction_type(vpred, "sdxl") == "v_prediction"

    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in shapes.items()
               if not k.startswith("conditioner.embedders.0.")}
    no_clip = {k: v for k, v in shapes.items() if "embedders.0." not in k}
    for name, cut, message in (("refiner", refiner, "an SDXL refiner"),
                               ("no-clip", no_clip, r"an SDXL checkpoint without CLIP weights "
                                                    r"\(conditioner\.embedders\.0\.transformer\.\*\)")):
        bad = _sparse_safetensors(tmp_path / f"{name}.safetensors", cut)
        with pytest.raises(ModelError, match=f"^{bad}: {message}"):
            resolve_base(bad)
