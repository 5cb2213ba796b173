"""LoRA files as people train and share them, on a SD 1.5-layout pipeline at reduced width (the real layer
layout: four down blocks of two layers, conv 1x1 proj_in/proj_out, 3x3 ResNet convs): kohya alpha and
per-layer ranks, export-lora keeping each layer's scale, partial loads and non-LoRA layer kinds refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from das_sd.generation import GenerationSettings, generate
from das_sd.models.loading import ModelError, export_lora, load_lora, load_pipeline
from tolerances import ALGEBRAIC_RTOL, relative_error, sampler_atol

pytestmark = pytest.mark.numerics

# kohya's SD 1.x default (attention, feed-forward, the 1x1 conv projections) and LoCon's ResNet convs
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
STEPS, GUIDANCE = 4, 4.0


@pytest.fixture(scope="module")
def sd15_base(tmp_path_factory, base_path):
    """The embedded pipeline with a SD 1.5-layout UNet (block widths 32-64-64-64 instead of 320-640-1280-1280)."""
    from diffusers import UNet2DConditionModel

    pipe = load_pipeline(base_path, device="cpu")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(32, 64, 64, 64), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=pipe.text_encoder.config.hidden_size)
    folder = tmp_path_factory.mktemp("sd15") / "base"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _layers(pipe, text_encoder: bool = True):
    """(model, module path as LoRA files spell it, module) of every targeted linear / conv layer."""
    models = [("unet", pipe.unet, UNET_TARGETS)] + ([("text_encoder", pipe.text_encoder, TEXT_TARGETS)] if text_encoder else [])
    for model, root, targets in models:
        for name, module in root.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(targets):
                if model == "text_encoder" and not name.startswith("text_model."):
                    name = "text_model." + name  # transformers 5 dropped the submodule; files keep it
                yield model, name, module


def _random_pair(module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_down (A) and lora_up (B) shaped as kohya and peft shape them: a conv's A is a conv of the
    module's kernel, its B a 1x1 conv."""
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g, dtype=torch.float64)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=g, dtype=torch.float64)
    else:
        down = torch.randn(rank, module.in_features, generator=g, dtype=torch.float64)
        up = torch.randn(module.out_features, rank, generator=g, dtype=torch.float64)
    return down / down[0].numel() ** 0.5, up * 0.3 / rank ** 0.5


def kohya_file(pipe, ranks, alphas, seed: int = 0):
    """A kohya / LoCon file (UNet and text encoder), float64; and the expected update per layer."""
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for i, (model, name, module) in enumerate(_layers(pipe)):
        rank, alpha = ranks[i % len(ranks)], alphas[i % len(alphas)]
        down, up = _random_pair(module, rank, g)
        key = ("lora_unet_" if model == "unet" else "lora_te_") + name.replace(".", "_")
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
        expected[(model, name)] = alpha / rank * (up.flatten(1) @ down.flatten(1))
    return state, expected


def loaded_updates(pipe, adapter: str = "default") -> dict:
    """scaling * B A of every LoRA layer peft holds in the pipeline, as (out, in * kh * kw)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for model in ("unet", "text_encoder"):
        for name, module in getattr(pipe, model).named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                if model == "text_encoder" and not name.startswith("text_model."):
                    name = "text_model." + name
                b, a = module.lora_B[adapter].weight, module.lora_A[adapter].weight
                out[(model, name)] = module.scaling[adapter] * (b.flatten(1).double() @ a.flatten(1).double())
    return out


def assert_same_updates(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for layer, value in expected.items():
        assert relative_error(got[layer], value) < ALGEBRAIC_RTOL, layer


def merged_by_hand(base, expected: dict):
    """Independent expectation: each layer's update added to the base weights, no peft involved."""
    pipe = load_pipeline(base, device="cpu")
    modules = {"unet": dict(pipe.unet.named_modules()), "text_encoder": dict(pipe.text_encoder.named_modules())}
    with torch.no_grad():
        for (model, name), delta in expected.items():
            module = modules[model].get(name) or modules[model][name.removeprefix("text_model.")]
            module.weight += delta.view(module.weight.shape).float()
    return pipe


def latents(pipe) -> torch.Tensor:
    settings = GenerationSettings(prompt="a red circle on a blue background, zorblat", steps=STEPS, guidance=GUIDANCE,
                                  num_images=2)
    return generate(pipe, settings).latents


def assert_same_generation(got: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> None:
    assert torch.isfinite(got).all()
    atol = sampler_atol(STEPS, GUIDANCE, scale=max(3.0, float(expected.abs().max())))  # the random UNet's latents reach ~15
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert (expected - base).abs().max() > 100 * atol  # the LoRA changes the images far beyond the bound


def test_kohya_alpha_and_ranks_load_as_diffusers_loads_them(sd15_base, tmp_path):
    """One alpha != rank, ranks per layer, attention + 1x1 and 3x3 convs + text encoder: das-sd and
    diffusers' own load_lora_weights give the same updates, alpha / rank * up @ down, and images."""
    pipe = load_pipeline(sd15_base, device="cpu", dtype=torch.float64)
    state, expected = kohya_file(pipe, ranks=(2, 4, 3), alphas=(6.0,))
    save_file(state, str(tmp_path / "kohya.safetensors"))
    assert load_lora(pipe, tmp_path / "kohya.safetensors") == "kohya"
    assert_same_updates(loaded_updates(pipe), expected)
    theirs = load_pipeline(sd15_base, device="cpu", dtype=torch.float64)
    theirs.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors", adapter_name="default")
    assert_same_updates(loaded_updates(theirs), expected)

    ours, theirs = load_pipeline(sd15_base, device="cpu"), load_pipeline(sd15_base, device="cpu")
    load_lora(ours, tmp_path / "kohya.safetensors")
    theirs.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    assert_same_generation(latents(ours), latents(theirs), latents(load_pipeline(sd15_base, device="cpu")))


def test_kohya_alphas_that_differ_per_layer_are_each_honoured(sd15_base, tmp_path):
    """diffusers 0.42 gives attention layers the file's most common alpha instead of their own; das-sd
    gives every layer its own alpha / rank (images checked against the updates merged by hand)."""
    pipe = load_pipeline(sd15_base, device="cpu", dtype=torch.float64)
    state, expected = kohya_file(pipe, ranks=(2, 4, 3), alphas=(1.0, 8.0, 2.0, 0.5, 3.0), seed=1)
    save_file(state, str(tmp_path / "kohya.safetensors"))
    load_lora(pipe, tmp_path / "kohya.safetensors")
    assert_same_updates(loaded_updates(pipe), expected)

    ours = load_pipeline(sd15_base, device="cpu")
    load_lora(ours, tmp_path / "kohya.safetensors")
    assert_same_generation(latents(ours), latents(merged_by_hand(sd15_base, expected)),
                           latents(load_pipeline(sd15_base, device="cpu")))


@pytest.mark.parametrize("config", [
    {"r": 4, "lora_alpha": 6.0, "rank_pattern": {"proj_in": 2, "^mid_block.attentions.0.proj_out": 3},
     "alpha_pattern": {"conv1": 1.5, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 9.0}},
    {"r": 4, "lora_alpha": 6.0, "use_rslora": True},
])
def test_peft_ranks_and_alphas_per_layer_are_honoured(sd15_base, tmp_path, config):
    """adapter_config.json's rank_pattern / alpha_pattern / use_rslora, matched the way peft matches them."""
    pipe = load_pipeline(sd15_base, device="cpu", dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    state, expected = {}, {}
    patterns = {**config.get("rank_pattern", {}), **config.get("alpha_pattern", {})}
    hit = set()
    for _, name, module in _layers(pipe, text_encoder=False):
        def pick(pattern: dict, default):
            key = next((k for k in pattern if name == k.lstrip("^") or name.endswith("." + k)), None)
            hit.add(key)
            return pattern.get(key, default)
        rank, alpha = pick(config.get("rank_pattern", {}), config["r"]), pick(config.get("alpha_pattern", {}), config["lora_alpha"])
        down, up = _random_pair(module, rank, g)
        state.update({f"base_model.model.{name}.lora_A.weight": down, f"base_model.model.{name}.lora_B.weight": up})
        scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
        expected[("unet", name)] = scale * (up.flatten(1) @ down.flatten(1))
    assert set(patterns) <= hit  # every pattern names a layer
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    assert load_lora(pipe, tmp_path) == "peft"
    assert_same_updates(loaded_updates(pipe), expected)


def diffusers_file(pipe, folder, lora_alpha: float, rank_pattern: dict, alpha_pattern: dict, text_encoder: bool):
    """A diffusers-format file as das-sd's train-lora writes one (save_lora_weights with the adapters'
    LoraConfig as metadata), with conv layers; float64. Returns the expected update per layer."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    g = torch.Generator().manual_seed(3)
    layers = {"unet": {}, "text_encoder": {}}
    expected = {}
    for model, name, module in _layers(pipe, text_encoder=text_encoder):
        if model == "unet" and not name.startswith(("down_blocks.0.", "down_blocks.1.", "mid_block.")):
            continue  # a part of the UNet is enough here
        rank = rank_pattern.get(name, 4) if model == "unet" else 2
        alpha = alpha_pattern.get(name, lora_alpha) if model == "unet" else 5.0
        down, up = _random_pair(module, rank, g)
        layers[model][f"{name}.lora_A.weight"] = down
        layers[model][f"{name}.lora_B.weight"] = up
        expected[(model, name)] = alpha / rank * (up.flatten(1) @ down.flatten(1))
    unet_config = LoraConfig(r=4, lora_alpha=lora_alpha, rank_pattern={f"^{k}": v for k, v in rank_pattern.items()},
                             alpha_pattern={f"^{k}": v for k, v in alpha_pattern.items()},
                             target_modules=sorted(k.rsplit(".lora_", 1)[0] for k in layers["unet"]))
    text_config = LoraConfig(r=2, lora_alpha=5.0, target_modules=list(TEXT_TARGETS))
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"] or None,
        safe_serialization=True, unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict() if text_encoder else None)
    return expected


@pytest.mark.parametrize("to", ["kohya", "peft"])
@pytest.mark.parametrize("alphas", ["one", "per-layer"])
def test_export_keeps_every_layers_scale(sd15_base, tmp_path, to, alphas):
    """A diffusers file with lora_alpha != r (ranks and, here, alphas per layer) exported to kohya
    (alpha per layer) or peft (scale folded into lora_B) loads to the same updates and images."""
    pipe = load_pipeline(sd15_base, device="cpu", dtype=torch.float64)
    rank_pattern = {"down_blocks.0.attentions.0.proj_in": 2, "down_blocks.1.resnets.0.conv1": 3,
                    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": 8}
    alpha_pattern = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1.0,
                     "down_blocks.1.resnets.0.conv1": 9.0} if alphas == "per-layer" else {}
    expected = diffusers_file(pipe, tmp_path / "lora", 12.0, rank_pattern, alpha_pattern, text_encoder=to == "kohya")
    load_lora(pipe, tmp_path / "lora")
    assert_same_updates(loaded_updates(pipe), expected)  # the file as diffusers reads it

    out = export_lora(tmp_path / "lora", to, tmp_path / to / ("adapter_model.safetensors" if to == "peft" else "k.safetensors"))
    exported = load_pipeline(sd15_base, device="cpu", dtype=torch.float64)
    assert load_lora(exported, out) == to
    assert_same_updates(loaded_updates(exported), expected)
    if to == "kohya" and alphas == "one":  # diffusers reads per-layer alphas of attention layers wrong
        theirs = load_pipeline(sd15_base, device="cpu", dtype=torch.float64)
        theirs.load_lora_weights(str(out.parent), weight_name=out.name, adapter_name="default")
        assert_same_updates(loaded_updates(theirs), expected)

    original, again = load_pipeline(sd15_base, device="cpu"), load_pipeline(sd15_base, device="cpu")
    load_lora(original, tmp_path / "lora")
    load_lora(again, out)
    assert_same_generation(latents(again), latents(original), latents(load_pipeline(sd15_base, device="cpu")))


def test_export_of_a_lora_trained_with_alpha_not_rank_keeps_its_outputs(base_path, demo_data, tmp_path):
    """The review's case: `train-lora --alpha 7 --rank 2`, then export-lora to kohya and to peft."""
    from das_sd.data.datasets import open_dataset
    from das_sd.lora_record import LoraRecipe
    from das_sd.train import train_lora
    from helpers import unet_outputs
    from tolerances import FLOAT32_FORWARD_ATOL, FLOAT32_FORWARD_RTOL

    dataset = open_dataset(demo_data)
    recipe = LoraRecipe(steps=4, batch_size=2, rank=2, alpha=7.0, learning_rate=0.01, text_encoder_rank=0)
    train_lora(base_path, dataset.subset(dataset.keys[::60]), tmp_path / "lora", recipe, progress=False)
    trained = load_pipeline(base_path, device="cpu")
    load_lora(trained, tmp_path / "lora")
    expected = unet_outputs(trained)
    base = unet_outputs(load_pipeline(base_path, device="cpu"))
    assert (expected - base).abs().max() > 100 * (FLOAT32_FORWARD_ATOL + FLOAT32_FORWARD_RTOL * base.abs().max())
    for to in ("kohya", "peft"):
        reloaded = load_pipeline(base_path, device="cpu")
        load_lora(reloaded, export_lora(tmp_path / "lora", to, tmp_path / to / f"{to}.safetensors"))
        assert torch.allclose(unet_outputs(reloaded), expected, atol=FLOAT32_FORWARD_ATOL, rtol=FLOAT32_FORWARD_RTOL), to


def _forbid_diffusers(pipe, monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("diffusers was asked to load a file das-sd refuses")

    for name in ("load_lora_weights", "load_lora_into_unet", "load_lora_into_text_encoder"):
        monkeypatch.setattr(pipe, name, never)


def test_a_file_mixing_key_styles_is_refused(sd15_base, tmp_path, monkeypatch):
    """diffusers loads one style per file and drops the other half of this one without an error."""
    pipe = load_pipeline(sd15_base, device="cpu")
    g = torch.Generator().manual_seed(4)
    state = {}
    for i, (_, name, module) in enumerate(_layers(pipe, text_encoder=False)):
        down, up = (t.float() for t in _random_pair(module, 2, g))
        if i % 2:
            key = "lora_unet_" + name.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
        else:
            state.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
    save_file(state, str(tmp_path / "mixed.safetensors"))
    _forbid_diffusers(pipe, monkeypatch)
    with pytest.raises(ModelError, match=r"mixed\.safetensors: its keys mix styles: (?=.*diffusers \(e\.g\. 'unet\.)"
                                         r"(?=.*kohya \(e\.g\. 'lora_unet_)"):
        load_lora(pipe, tmp_path / "mixed.safetensors")


@pytest.mark.parametrize("model", ["unet", "text_encoder"])
def test_a_lora_that_loads_fewer_layers_than_its_file_holds_is_refused(sd15_base, tmp_path, model):
    """A diffusers file with one layer of a module the model lacks: diffusers loads the others and drops
    it without an error; das-sd counts the LoRA weights peft holds against the file's and refuses."""
    pipe = load_pipeline(sd15_base, device="cpu")
    g = torch.Generator().manual_seed(5)
    state = {}
    for kind, name, module in _layers(pipe):
        down, up = (t.float() for t in _random_pair(module, 2, g))
        state.update({f"{kind}.{name}.lora_A.weight": down, f"{kind}.{name}.lora_B.weight": up})
    ghost = ("unet.down_blocks.0.attentions.7.proj_in" if model == "unet"
             else "text_encoder.text_model.encoder.layers.9.self_attn.q_proj")
    real = next(k for k in state if k.startswith(model + ".") and k.endswith((".proj_in.lora_A.weight", ".q_proj.lora_A.weight")))
    state[f"{ghost}.lora_A.weight"] = state[real].clone()
    state[f"{ghost}.lora_B.weight"] = state[real.replace("lora_A", "lora_B")].clone()
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ModelError, match=rf"pytorch_lora_weights\.safetensors: the file holds [\d,]+ LoRA weights for the "
                                         rf"{model}, but [\d,]+ loaded into it; keys that did not load, e\.g\. {ghost}"):
        load_lora(pipe, tmp_path)
    assert not getattr(pipe.unet, "peft_config", None)  # the part that loaded is unloaded again


def test_kohya_layers_of_another_model_layout_are_refused(sd15_base, tmp_path):
    pipe = load_pipeline(sd15_base, device="cpu")
    state, _ = kohya_file(pipe, ranks=(2,), alphas=(1.0,))
    state = {k.replace("lora_unet_down_blocks_1_", "lora_unet_input_blocks_4_"): v.float() for k, v in state.items()}
    save_file(state, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(ModelError, match=r"ldm\.safetensors: \d+ of its \d+ kohya layers name no layer of this pipeline "
                                         r"\(e\.g\. lora_unet_input_blocks_4_"):
        load_lora(pipe, tmp_path / "ldm.safetensors")


def _lycoris(pipe, kind: str, style: str) -> dict[str, torch.Tensor]:
    """Two layers of a LyCORIS / DoRA kind, in kohya or diffusers key style."""
    g = torch.Generator().manual_seed(6)
    state = {}
    for _, name, module in list(_layers(pipe, text_encoder=False))[:2]:
        key = "lora_unet_" + name.replace(".", "_") if style == "kohya" else f"unet.{name}"
        out, inp = module.weight.shape[:2]
        if kind == "loha":
            parts = {"hada_w1_a": (out, 2), "hada_w1_b": (2, inp), "hada_w2_a": (out, 2), "hada_w2_b": (2, inp)}
        elif kind == "lokr":
            parts = {"lokr_w1": (4, 4), "lokr_w2": (out // 4, inp // 4)}
        elif kind == "tucker":
            parts = {"lora_down.weight": (2, inp, 1, 1), "lora_mid.weight": (2, 2, 3, 3), "lora_up.weight": (out, 2, 1, 1)}
        else:  # dora: kohya's dora_scale next to a LoRA pair
            parts = {"lora_down.weight": (2, inp), "lora_up.weight": (out, 2), "dora_scale": (out, 1)}
        state.update({f"{key}.{part}": torch.randn(*shape, generator=g) for part, shape in parts.items()})
        if style == "kohya":
            state[f"{key}.alpha"] = torch.tensor(2.0)
    return state


@pytest.mark.parametrize("kind,style,named", [
    ("loha", "kohya", r"LoHa \(LyCORIS"), ("lokr", "kohya", r"LoKr \(LyCORIS"), ("tucker", "kohya", r"LoCon with a Tucker core \(LyCORIS lora_mid\)"),
    ("dora", "kohya", r"DoRA \(dora_scale\)"), ("loha", "diffusers", r"LoHa"), ("lokr", "diffusers", r"LoKr"),
])
def test_layer_kinds_that_are_not_lora_pairs_get_das_sds_refusal(sd15_base, tmp_path, monkeypatch, kind, style, named):
    """Before diffusers is called (it fails on LoHa / LoKr / lora_mid with a key-renaming error, and loads a
    kohya DoRA file as a plain LoRA, its magnitudes dropped)."""
    pipe = load_pipeline(sd15_base, device="cpu")
    save_file(_lycoris(pipe, kind, style), str(tmp_path / f"{kind}.safetensors"))
    _forbid_diffusers(pipe, monkeypatch)
    with pytest.raises(ModelError, match=rf"{kind}\.safetensors: {named}.* layers \(e\.g\. key '.*'\) cannot be "
                                         r"loaded: das-sd loads LoRA layers \(lora_down / lora_up"):
        load_lora(pipe, tmp_path / f"{kind}.safetensors")
