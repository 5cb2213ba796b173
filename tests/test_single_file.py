"""Single-file SD 1.x / 2.x checkpoints (A1111 / ComfyUI .safetensors in the original LDM key layout)
load offline wherever a base model is taken: the same UNet, VAE and text-encoder outputs as the
diffusers pipeline they were written from, `das-sd generate` and `das-sd featurize` on them, a store
identity naming the file's hash. The family is told from the header (full-size headers checked on
sparse files); SD 2.x's prediction type from metadata, an A1111 yaml or the environment, never guessed.
Pickles, SDXL refiners and other models are refused naming the file (SDXL base files:
test_single_file_sdxl.py)."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from das_sd.cli import main
from das_sd.models import single_file, tokenizer
from das_sd.models.fingerprint import model_fingerprint, provenance
from das_sd.models.loading import ModelError, load_pipeline, resolve_base
from das_sd.models.single_file_configs import FAMILIES, shipped_config, write_configs
from helpers import TINY_FEATURIZE, subset_dataset
from ldm_layout import pipeline_to_ldm
from sd_layouts import ATTENTION, add_random_lora, sd_pipeline
from tolerances import FLOAT32_FORWARD_ATOL, FLOAT32_FORWARD_RTOL

pytestmark = pytest.mark.numerics

PREDICTION = {"sd15": "epsilon", "sd2": "v_prediction"}


def _config_folder(pipe, folder):
    """The reduced-width pipeline's configs (and tokenizer), no weights: what --base FILE needs for a
    model that is not SD 1.x / 2.x at full width."""
    pipe.save_config(folder)
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    assert not [p for p in folder.rglob("*.safetensors")]
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family: the diffusers pipeline, its single-file checkpoint and its config folder."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for family in ("sd15", "sd2"):
        pipe = sd_pipeline(family, prediction_type=PREDICTION[family], seed=3)
        file = root / f"{family}-model.safetensors"
        save_file(pipeline_to_ldm(pipe, family), str(file), metadata={"format": "pt"})
        out[family] = {"pipe": pipe, "file": file, "config": _config_folder(pipe, root / f"{family}-config")}
    return out


@pytest.fixture()
def no_hub(monkeypatch):
    """Any attempt to reach the hub fails the test (beyond conftest's HF_HUB_OFFLINE)."""
    import diffusers.loaders.single_file as sf
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"hub access: {args} {kwargs}")

    monkeypatch.setattr(sf, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def _outputs(pipe):
    """UNet, VAE (encode mean, decode) and text-encoder outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size
    x = torch.randn(2, 4, size, size, generator=g)
    image = torch.rand(2, 3, 2 * size, 2 * size, generator=g) * 2 - 1
    ids = pipe.tokenizer(["a red circle, striped style", "a green square"], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return {"text_encoder": text,
                "unet": pipe.unet(x, torch.tensor([10, 700]), encoder_hidden_states=text).sample,
                "vae_encode": pipe.vae.encode(image).latent_dist.mean,
                "vae_decode": pipe.vae.decode(x).sample}


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_single_file_loads_to_the_outputs_of_the_pipeline_it_was_written_from(checkpoints, family, monkeypatch,
                                                                              no_hub):
    case = checkpoints[family]
    monkeypatch.setenv(single_file.CONFIG_ENV, str(case["config"]))
    assert resolve_base(case["file"]) == case["file"]
    loaded = load_pipeline(case["file"], device="cpu")
    assert loaded.scheduler.config.prediction_type == PREDICTION[family]
    expected, got = _outputs(case["pipe"]), _outputs(loaded)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=FLOAT32_FORWARD_RTOL, atol=FLOAT32_FORWARD_ATOL), name
    # the same weights, bit for bit, through diffusers' own original -> diffusers conversion
    for name in ("unet", "vae", "text_encoder"):
        original = getattr(case["pipe"], name).state_dict()
        assert all(torch.equal(t, original[k]) for k, t in getattr(loaded, name).state_dict().items()), name
    # the explicit argument works without the environment, and a tokenizer folder is taken as it is
    monkeypatch.delenv(single_file.CONFIG_ENV)
    again = single_file.load_single_file(case["file"], device="cpu", config=case["config"],
                                         tokenizer=case["config"] / "tokenizer")
    assert torch.equal(_outputs(again)["unet"], got["unet"])


def test_a_weight_missing_from_the_file_is_refused_not_left_random(checkpoints, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    case = checkpoints["sd15"]
    state = load_file(str(case["file"]))
    del state["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    monkeypatch.setenv(single_file.CONFIG_ENV, str(case["config"]))
    missing = r"cut\.safetensors: 1 of the unet's weights are not in the checkpoint \(e\.g\. .down_blocks\.0\.attentions\.0\.proj_in"
    with pytest.raises(ModelError, match=missing):
        load_pipeline(tmp_path / "cut.safetensors", device="cpu")


def test_generate_and_featurize_take_a_single_file_and_the_store_names_its_hash(checkpoints, demo_data, tmp_path,
                                                                                monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from PIL import Image

    from das_sd.attribute import Attributor
    from das_sd.store import FeatureStore

    case = checkpoints["sd15"]
    monkeypatch.setenv(single_file.CONFIG_ENV, str(case["config"]))
    digest = hashlib.sha256(case["file"].read_bytes()).hexdigest()
    assert model_fingerprint(case["file"]) == f"sha256:{digest}"
    assert provenance(case["file"])["base_name"] == "sd15-model"

    pipe = sd_pipeline("sd15", seed=3)
    add_random_lora(pipe.unet, ATTENTION, rank=2, seed=1)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"

    assert main(["generate", "--base", str(case["file"]), "--lora", str(lora), "--prompt", "a red circle",
                 "--steps", "2", "--out", str(tmp_path / "gen.png"), "--device", "cpu"]) == 0
    assert f"Model: sd15-model, Model hash: {digest[:10]}" in Image.open(tmp_path / "gen.png").info["parameters"]

    data = subset_dataset(demo_data, tmp_path / "data", 2)
    capsys.readouterr()
    assert main(["featurize", "--base", str(case["file"]), "--lora", str(lora), "--data", str(data),
                 "--store", str(tmp_path / "store"), "--device", "cpu", "--feature-sets", "das", *TINY_FEATURIZE]) == 0
    store = FeatureStore.open(tmp_path / "store")
    assert store.identity["base_fingerprint"] == f"sha256:{digest}" and len(store) == 2
    assert store.manifest["info"]["base_path"] == str(case["file"])
    # attribution reloads the base from the file and checks it against the store
    Attributor(store, device="cpu")


def test_pickles_sdxl_refiners_and_other_files_are_refused_naming_the_file(tmp_path, capsys):
    cases = {"model.ckpt": (b"\x80\x04K\x01.", "pickled checkpoints are never loaded.*safetensors"),
             "model.pt": (b"\x80\x04K\x01.", "pickled"),
             "garbage.safetensors": (b"x" * 16, "not a readable single-file checkpoint")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError, match=f"^{tmp_path / name}: {message}"):
            resolve_base(tmp_path / name)
    headers = {"refiner": ({"conditioner.embedders.0.model.ln_final.weight": [1280],
                            "model.diffusion_model.input_blocks.0.0.weight": [384, 4, 3, 3]}, "an SDXL refiner"),
               "sdxl-novae": ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": [768],
                               "conditioner.embedders.1.model.ln_final.weight": [1280],
                               "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]},
                              r"an SDXL checkpoint without VAE weights \(first_stage_model\.\*\)"),
               "inpaint": ({"model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3],
                            "first_stage_model.encoder.conv_in.weight": [128, 3, 3, 3],
                            "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]}, "9 input channels"),
               "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 320]}, "pass it with --lora"),
               "novae": ({"model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3],
                          "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]}, "no VAE weights")}
    for name, (shapes, message) in headers.items():
        file = _sparse_safetensors(tmp_path / f"{name}.safetensors", shapes)
        with pytest.raises(ModelError, match=f"^{file}: .*{message}"):
            resolve_base(file)
    assert main(["generate", "--base", str(tmp_path / "model.ckpt"), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'model.ckpt'}: pickled checkpoints are never loaded" in capsys.readouterr().err
    with pytest.raises(ModelError, match="checkpoint file not found"):
        resolve_base(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------
# Full-size headers: the real key names and shapes in a sparse file (no weights written or read)

def _sparse_safetensors(path, shapes: dict, metadata: dict | None = None, dtype: str = "F16"):
    """A safetensors file with these tensor shapes whose data is a hole: the header is real, the
    file has the size it claims, and its bytes (zeros) are never written."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


def _full_size_shapes(family: str) -> dict:
    """The original-layout key names and shapes of a full-size model of the family (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    folder = shipped_config("sd1" if family == "sd15" else "sd2-768-v")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    text_state = text.state_dict()
    state = {**unet_to_ldm(unet.state_dict()), **vae_to_ldm(vae.state_dict())}
    state.update(clip_to_ldm(text_state) if family == "sd15" else open_clip_to_ldm(text_state))
    return {k: list(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def full_size():
    return {family: _full_size_shapes(family) for family in ("sd15", "sd2")}


def test_full_size_headers_pick_the_shipped_configs(full_size, tmp_path, monkeypatch):
    monkeypatch.delenv(single_file.PREDICTION_ENV, raising=False)
    sd15 = _sparse_safetensors(tmp_path / "v1-5.safetensors", full_size["sd15"])
    assert sd15.stat().st_size > 1.5e9 and sd15.stat().st_blocks * 512 < 1e7  # sparse: nothing of size on disk
    assert resolve_base(sd15) == sd15
    shapes = single_file.read_header(sd15)[0]
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == [320, 768]
    assert single_file.detect_family(shapes) == "sd1"
    assert single_file.resolve_prediction_type(sd15, "sd1") == "epsilon"
    assert single_file.config_folder(sd15, "sd1", "epsilon") == shipped_config("sd1")
    # diffusers' own renaming of the full-size header gives every UNet and VAE weight the shipped
    # configs build, in their shapes (and a header cut short is told apart)
    assert single_file._missing_weights(sd15, shipped_config("sd1")) is None

    sd2 = _sparse_safetensors(tmp_path / "v2-1.safetensors", full_size["sd2"])
    assert single_file.detect_family(single_file.read_header(sd2)[0]) == "sd2"
    for folder in ("sd2-768-v", "sd2-512-base"):
        assert single_file._missing_weights(sd2, shipped_config(folder)) is None
    assert "the unet's weights have other shapes" in single_file._missing_weights(sd2, shipped_config("sd1"))
    with pytest.raises(ModelError, match=f"^{sd2}: an SD 2.x checkpoint.*{single_file.PREDICTION_ENV}=v_prediction"):
        single_file.resolve_prediction_type(sd2, "sd2")
    # A1111's config beside the file says it; "parameterization" absent means epsilon (LDM's default)
    (tmp_path / "v2-1.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert single_file.resolve_prediction_type(sd2, "sd2") == "v_prediction"
    (tmp_path / "v2-1.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert single_file.resolve_prediction_type(sd2, "sd2") == "epsilon"
    for value, expected in (("v", "v_prediction"), ("epsilon", "epsilon")):
        spec = _sparse_safetensors(tmp_path / f"spec-{value}.safetensors", full_size["sd2"],
                                   {"modelspec.prediction_type": value})
        assert single_file.resolve_prediction_type(spec, "sd2") == expected
    arch = _sparse_safetensors(tmp_path / "arch.safetensors", full_size["sd2"],
                               {"modelspec.architecture": "stable-diffusion-v2-768-v"})
    assert single_file.resolve_prediction_type(arch, "sd2") == "v_prediction"
    assert single_file.config_folder(arch, "sd2", "v_prediction") == shipped_config("sd2-768-v")
    assert single_file.config_folder(arch, "sd2", "epsilon") == shipped_config("sd2-512-base")
    monkeypatch.setenv(single_file.PREDICTION_ENV, "epsilon")
    assert single_file.resolve_prediction_type(arch, "sd2") == "epsilon"  # the environment has the last word
    monkeypatch.setenv(single_file.PREDICTION_ENV, "v")
    with pytest.raises(ModelError, match="DAS_SD_PREDICTION_TYPE='v'"):
        single_file.resolve_prediction_type(arch, "sd2")

    mixed = dict(full_size["sd2"])
    mixed = {k: v for k, v in mixed.items() if not k.startswith("cond_stage_model.")} | {
        k: v for k, v in full_size["sd15"].items() if k.startswith("cond_stage_model.")}
    with pytest.raises(ModelError, match="a mix of SD 1.x and SD 2.x parts"):
        resolve_base(_sparse_safetensors(tmp_path / "mixed.safetensors", mixed))


def test_shipped_configs_are_the_published_architectures(tmp_path):
    """Regenerated from single_file_configs equal the shipped files; at full size the models have the
    published parameter counts (SD 1.5: UNet 859.5 M, VAE 83.7 M, CLIP ViT-L text 123.1 M; SD 2.x: UNet
    865.9 M, OpenCLIP ViT-H text up to its penultimate layer 340.4 M; SDXL base: UNet 2,567.5 M, VAE
    83.7 M, CLIP ViT-L 123.1 M, OpenCLIP ViT-bigG with projection 694.7 M)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def strip(data: dict) -> dict:
        return {k: v for k, v in data.items() if k not in ("_diffusers_version", "transformers_version")}

    counts = {"sd1": (859_520_964, 83_653_863, 123_060_480), "sd2-768-v": (865_910_724, 83_653_863, 340_387_840),
              "sd2-512-base": (865_910_724, 83_653_863, 340_387_840),
              "sdxl": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)}
    for family in FAMILIES:
        fresh = write_configs(tmp_path / family, family)
        shipped = shipped_config(family)
        files = sorted(p.relative_to(shipped) for p in shipped.rglob("*.json"))
        assert files == sorted(p.relative_to(fresh) for p in fresh.rglob("*.json"))
        for f in files:
            assert strip(json.loads((shipped / f).read_text())) == strip(json.loads((fresh / f).read_text())), f
        with torch.device("meta"):
            models = (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped / "unet")),
                      AutoencoderKL.from_config(AutoencoderKL.load_config(shipped / "vae")),
                      CLIPTextModel(CLIPTextConfig.from_pretrained(shipped / "text_encoder")))
            if (shipped / "text_encoder_2").is_dir():
                models += (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(shipped / "text_encoder_2")),)
        assert tuple(sum(p.numel() for p in m.parameters()) for m in models) == counts[family]


# ---------------------------------------------------------------------------------------------
# The tokenizer: never shipped, found offline or asked for

def _fake_hub_cache(cache, repo: str, tokenizer_folder, subfolder: str | None = None):
    """The layout huggingface_hub keeps downloads in: models--org--name/snapshots/<rev>, refs/main."""
    import shutil

    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    shutil.copytree(tokenizer_folder, snapshot / subfolder if subfolder else snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)


def test_the_tokenizer_comes_from_the_hub_cache_offline_or_the_error_says_how_to_get_it(base_path, tmp_path,
                                                                                     monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv(tokenizer.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    for family, repo in (("sd1", "openai/clip-vit-large-patch14"), ("sd2", "stabilityai/stable-diffusion-2-1")):
        with pytest.raises(ModelError, match=rf"model\.safetensors: the checkpoint needs the CLIP tokenizer.*"
                                             rf"`hf download {repo}.*{tokenizer.TOKENIZER_ENV}"):
            tokenizer.resolve_tokenizer(family, path=tmp_path / "model.safetensors")
    # the CLIP tokenizer in the cache (here the embedded model's small vocabulary under its name) serves
    # both families, with each family's pad token; one whose size is not the text encoder's is passed over
    _fake_hub_cache(tmp_path / "hub", "openai/clip-vit-large-patch14", base_path / "tokenizer")
    n = 566
    sd1, sd2 = tokenizer.resolve_tokenizer("sd1", vocab_size=n), tokenizer.resolve_tokenizer("sd2", vocab_size=n)
    assert sd1.pad_token == "<|endoftext|>" and sd2.pad_token == "!" and len(sd1) == len(sd2) == n
    with pytest.raises(ModelError, match="hf download openai/clip-vit-large-patch14"):
        tokenizer.resolve_tokenizer("sd1")  # 49408 tokens expected
    # an explicit folder (or a pipeline folder holding tokenizer/) is used as it is
    sd2.save_pretrained(tmp_path / "pipeline" / "tokenizer")
    monkeypatch.setenv(tokenizer.TOKENIZER_ENV, str(tmp_path / "pipeline"))
    assert tokenizer.resolve_tokenizer("sd1", vocab_size=n).pad_token == "!"
    with pytest.raises(ModelError, match=f"{tmp_path / 'pipeline' / 'tokenizer'}: a tokenizer of {n} tokens; "
                                         "the text encoder takes 49408"):
        tokenizer.resolve_tokenizer("sd1")
    monkeypatch.setenv(tokenizer.TOKENIZER_ENV, str(tmp_path / "hub"))  # transformers makes an empty one of it
    with pytest.raises(ModelError, match=f"{tmp_path / 'hub'}: no CLIP tokenizer there"):
        tokenizer.resolve_tokenizer("sd1")
