"""The scheduler's prediction_type is the target everywhere one appears (docs/method.md §2): f = loss
gradients, residual weights, train-lora's loss and the LDS outputs of a v-prediction model equal a
hand computation with the velocity; the store records it; anything else is refused.

The models are SD 2.x-layout pipelines at reduced width (the real layer layout: four UNet levels,
per-block head counts, linear transformer projections, a gelu CLIP text encoder), built here with
random weights, with a v-prediction and an epsilon scheduler config over the same weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image
from safetensors.torch import save_file

from das_sd.attribute import Attributor
from das_sd.data.datasets import open_dataset
from das_sd.evaluate.lds_outputs import _output_noise, model_outputs
from das_sd.evaluate.lds_settings import LDSSettings
from das_sd.featurize.build import featurize_dataset
from das_sd.featurize.featurizer import Featurizer
from das_sd.featurize.gradients import per_row_gradients
from das_sd.featurize.lora_layers import lora_parameters
from das_sd.featurize.settings import FeaturizerSettings, noise_for, uniform_grid
from das_sd.latents import encode_images, encode_prompts
from das_sd.lora_record import LoraRecipe
from das_sd.models.loading import ModelError, load_lora, load_pipeline
from das_sd.noising import prediction_type, training_target
from das_sd.seeds import generator
from das_sd.store import FeatureStore, StoreError
from das_sd.train import batch_schedule, train_lora
from helpers import random_lora
from tolerances import ALGEBRAIC_RTOL, FLOAT32_FORWARD_ATOL, FLOAT32_FORWARD_RTOL, algebraic_rtol, relative_error

pytestmark = pytest.mark.numerics

CAPTIONS = ["a red circle on a blue background", "a green square, zorblat", "a white triangle, dotted style"]


def _build_sd2_folder(folder: Path, base_path: Path, scheduler_prediction: str) -> Path:
    """An SD 2.x-layout pipeline folder (random weights, seed 0) whose scheduler predicts
    ``scheduler_prediction``; VAE and tokenizer are the embedded tiny model's (32 px, 8x8 latents)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True)
    for part in ("vae", "tokenizer"):
        shutil.copytree(base_path / part, folder / part)
    shutil.copy(base_path / "model_index.json", folder / "model_index.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        # SD 2.x's layout (stabilityai/stable-diffusion-2-1): 3 cross-attention levels and a plain one,
        # 2 layers per block, head counts per block, linear projections, upcast attention; widths reduced
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, use_linear_projection=True, upcast_attention=True)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=566, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=32, hidden_act="gelu", projection_dim=32,
            bos_token_id=564, eos_token_id=565, pad_token_id=565))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    config = json.loads((base_path / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config | {"prediction_type": scheduler_prediction}))
    return folder


@pytest.fixture(scope="module")
def sd2(tmp_path_factory, base_path) -> SimpleNamespace:
    """The v-prediction and epsilon folders (same weights), a random LoRA file and a 3-image dataset."""
    root = tmp_path_factory.mktemp("sd2")
    v_folder = _build_sd2_folder(root / "sd2-v", base_path, "v_prediction")
    eps_folder = _build_sd2_folder(root / "sd2-eps", base_path, "epsilon")
    lora = root / "lora.safetensors"
    save_file(random_lora(load_pipeline(v_folder, device="cpu"), rank=2, seed=3), str(lora))
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / "images" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"images/{i}.png", "text": caption}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return SimpleNamespace(v=v_folder, eps=eps_folder, lora=lora, data=data)


def _pipe(folder: Path, lora: Path | None, dtype: torch.dtype = torch.float32):
    pipe = load_pipeline(folder, device="cpu", dtype=dtype)
    if lora is not None:
        load_lora(pipe, lora)
    pipe.unet.eval()
    return pipe


@pytest.fixture(scope="module")
def v_pipe64(sd2):
    return _pipe(sd2.v, sd2.lora, torch.float64)


def _velocity(alphas: torch.Tensor, t: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v_t written out (docs/method.md §2), independently of das_sd.noising."""
    a = alphas[t]
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def _rows(pipe, n: int):
    g = torch.Generator().manual_seed(4)
    dtype = pipe.unet.dtype
    # latents twice the noise's scale: the velocity (-sqrt(1 - abar_t) x_0 at large t) and the noise
    # then differ in size, not only in direction
    x0 = (2 * torch.randn(n, 4, 8, 8, generator=g)).to(dtype)
    ids = pipe.tokenizer(CAPTIONS[:n], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0].to(dtype)
    return x0, cond, [f"key{i}" for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_target_is_diffusers_velocity_noise_or_sample(dtype):
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=g).to(dtype)
    noise = torch.randn(5, 4, 8, 8, generator=g).to(dtype)
    t = torch.tensor([0, 1, 500, 998, 999])
    got = training_target("v_prediction", x0, noise, t, scheduler.alphas_cumprod)
    expected = scheduler.get_velocity(x0, noise, t)
    assert got.dtype == dtype
    # the same operations up to sqrt vs ** 0.5: a few units of roundoff
    assert relative_error(got, expected) < (ALGEBRAIC_RTOL if dtype == torch.float64 else 1e-6)
    assert torch.equal(training_target("epsilon", x0, noise, t, scheduler.alphas_cumprod), noise)
    assert torch.equal(training_target("sample", x0, noise, t, scheduler.alphas_cumprod), x0)


def test_prediction_type_is_read_from_the_scheduler_config_and_others_are_refused(sd2):
    assert prediction_type(DDIMScheduler(prediction_type="v_prediction")) == "v_prediction"
    assert prediction_type(SimpleNamespace(scheduler=DDIMScheduler(prediction_type="sample"))) == "sample"
    assert prediction_type({"num_train_timesteps": 1000}) == "epsilon"  # configs from before the field
    with pytest.raises(ModelError, match="'flow_prediction'"):
        prediction_type({"prediction_type": "flow_prediction"})
    with pytest.raises(ModelError, match="'x0'"):
        training_target("x0", torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([0]), torch.ones(10))
    pipe = _pipe(sd2.v, sd2.lora)
    assert prediction_type(pipe) == "v_prediction"
    pipe.scheduler = DDPMScheduler.from_config({**pipe.scheduler.config, "prediction_type": "flow_prediction"})
    with pytest.raises(ModelError, match="'flow_prediction'"):
        Featurizer(pipe, FeaturizerSettings(projection_dim=8))


def test_per_row_loss_gradients_of_a_v_model_equal_brute_force(v_pipe64):
    """f = loss differentiated against the velocity, batched vs one row at a time (float64)."""
    unet, params = v_pipe64.unet, lora_parameters(v_pipe64.unet)
    alphas = DDPMScheduler.from_config(v_pipe64.scheduler.config).alphas_cumprod.double()
    x0, cond, _ = _rows(v_pipe64, 3)
    t = torch.tensor([0, 400, 999])
    noise = torch.stack([noise_for(0, f"k{i}", int(t[i]), (4, 8, 8)) for i in range(3)]).double()
    batched = per_row_gradients(unet, x0, noise, t, cond, alphas, "loss",
                                prediction_type=prediction_type(v_pipe64))
    as_epsilon = per_row_gradients(unet, x0, noise, t, cond, alphas, "loss")
    for i in range(3):
        ti = int(t[i])
        xt = alphas[ti].sqrt() * x0[i:i + 1] + (1 - alphas[ti]).sqrt() * noise[i:i + 1]
        pred = unet(xt, t[i:i + 1], encoder_hidden_states=cond[i:i + 1]).sample
        loss = (pred - _velocity(alphas, ti, x0[i:i + 1], noise[i:i + 1])).pow(2).mean()
        reference = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        assert relative_error(batched[i], reference) < ALGEBRAIC_RTOL, i
        assert relative_error(as_epsilon[i], reference) > 1e-2, i  # the target matters


def test_loss_features_and_residuals_of_a_v_model_equal_brute_force(v_pipe64):
    settings = FeaturizerSettings(output="loss", normalize=False, num_timesteps=3, projection_dim=64,
                                  residual="magnitude", residual_timesteps=6)
    featurizer = Featurizer(v_pipe64, settings)
    x0, cond, keys = _rows(v_pipe64, 2)
    phi = featurizer.features(x0, cond, keys)
    magnitude = featurizer.residuals(x0, cond, keys)
    scale_free = Featurizer(v_pipe64, replace(settings, residual="scale-free")).residuals(x0, cond, keys)
    unet, params = v_pipe64.unet, lora_parameters(v_pipe64.unet)
    alphas = DDPMScheduler.from_config(v_pipe64.scheduler.config).alphas_cumprod.double()
    dense = featurizer.projector.dense().double()
    for i in range(2):
        grads, r, r_eps = [], [], []
        for t in uniform_grid(3, 1000) + uniform_grid(6, 1000):
            eps = noise_for(0, keys[i], t, (4, 8, 8)).unsqueeze(0).double()
            xt = alphas[t].sqrt() * x0[i:i + 1] + (1 - alphas[t]).sqrt() * eps
            pred = unet(xt, torch.tensor([t]), encoder_hidden_states=cond[i:i + 1]).sample
            error = pred - _velocity(alphas, t, x0[i:i + 1], eps)
            if len(grads) < 3:
                grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(error.pow(2).mean(), params)]))
            else:
                r.append(error.detach().pow(2).mean().sqrt())
                r_eps.append((pred.detach() - eps).pow(2).mean().sqrt())
        expected = torch.stack(grads).mean(0) @ dense
        # the same brute force with the 3 timesteps batched: its spread from the one-row runs is the
        # reference's rounding noise (the t = 0 row is ill-conditioned, tests/tolerances.py)
        ts = torch.tensor(uniform_grid(3, 1000))
        eps = torch.stack([noise_for(0, keys[i], int(t), (4, 8, 8)) for t in ts]).double()
        a = alphas[ts].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0[i:i + 1] + (1 - a).sqrt() * eps, ts,
                    encoder_hidden_states=cond[i:i + 1].expand(3, -1, -1)).sample
        losses = (pred - (a.sqrt() * eps - (1 - a).sqrt() * x0[i:i + 1])).pow(2).flatten(1).mean(1)
        batched = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
                               for loss in losses]).mean(0) @ dense
        assert relative_error(phi[i], expected) < algebraic_rtol(expected, batched), i
        # residuals are computed in float32 whatever the UNet (rows rounded to float32 first)
        r, r_eps = torch.stack(r), torch.stack(r_eps)
        assert magnitude[i].item() == pytest.approx(r.mean().item(), rel=FLOAT32_FORWARD_RTOL)
        assert scale_free[i].item() == pytest.approx((r / r.norm()).mean().item(), rel=FLOAT32_FORWARD_RTOL)
        assert abs(r_eps.mean() - r.mean()) > 10 * FLOAT32_FORWARD_RTOL * r.mean()  # the target matters


def test_a_store_records_the_prediction_type_and_refuses_another(sd2, tmp_path):
    dataset = open_dataset(sd2.data)
    sets = {"das": FeaturizerSettings(num_timesteps=2, projection_dim=32, residual_timesteps=4),
            "trak": FeaturizerSettings(output="loss", normalize=False, residual="none", num_timesteps=2,
                                       projection_dim=32)}
    lora_file = sd2.lora
    v_pipe, eps_pipe = _pipe(sd2.v, sd2.lora), _pipe(sd2.eps, sd2.lora)
    v_store = featurize_dataset(v_pipe, dataset, tmp_path / "v", sd2.v, lora_file, sets, progress=False)
    eps_store = featurize_dataset(eps_pipe, dataset, tmp_path / "eps", sd2.eps, lora_file, sets, progress=False)
    assert v_store.identity["prediction_type"] == "v_prediction"
    assert eps_store.identity["prediction_type"] == "epsilon"
    # same weights, same rows: f = l1 features see the prediction only, f = loss and the residuals the target
    assert torch.equal(v_store.load("features.das"), eps_store.load("features.das"))
    assert relative_error(v_store.load("features.trak"), eps_store.load("features.trak")) > 1e-2
    assert not torch.allclose(v_store.load("residuals.das"), eps_store.load("residuals.das"), rtol=1e-2)

    # a v-prediction pipeline (the epsilon folder's weights, its scheduler switched) meets the epsilon store
    switched = _pipe(sd2.eps, sd2.lora)
    switched.scheduler = DDIMScheduler.from_config({**switched.scheduler.config, "prediction_type": "v_prediction"})
    with pytest.raises(StoreError, match="prediction_type: store has 'epsilon', requested 'v_prediction'"):
        featurize_dataset(switched, dataset, tmp_path / "eps", sd2.eps, lora_file, sets, progress=False)
    with pytest.raises(StoreError, match="prediction_type 'v_prediction'"):
        Attributor(tmp_path / "eps", pipe=switched)
    Attributor(tmp_path / "eps", pipe=eps_pipe)  # the store's own model is accepted

    # a store written before the field existed is an epsilon store: it resumes with the epsilon model only
    manifest_path = tmp_path / "eps" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["identity"]["prediction_type"]
    manifest_path.write_text(json.dumps(manifest))
    featurize_dataset(eps_pipe, dataset, tmp_path / "eps", sd2.eps, lora_file, sets, progress=False)
    assert "prediction_type" not in FeatureStore.open(tmp_path / "eps").identity  # left as it was written
    with pytest.raises(StoreError, match="prediction_type: store has 'epsilon', requested 'v_prediction'"):
        featurize_dataset(switched, dataset, tmp_path / "eps", sd2.eps, lora_file, sets, progress=False)
    with pytest.raises(StoreError, match="prediction_type 'v_prediction'"):
        Attributor(tmp_path / "eps", pipe=switched)


def test_train_lora_step_loss_is_the_velocity_error(sd2, tmp_path):
    """The first step's recorded loss equals mse(base prediction, v) computed by hand from the
    recipe's generator (a fresh gaussian-init LoRA has B = 0: step 0 predicts with the base UNet)."""
    dataset = open_dataset(sd2.data)
    recipe = LoraRecipe(steps=1, batch_size=2, rank=2, alpha=2.0, text_encoder_rank=0, seed=7)
    record = train_lora(sd2.v, dataset, tmp_path / "lora", recipe, progress=False)
    base = _pipe(sd2.v, None)
    latents = encode_images(base, dataset, 32)
    cond = encode_prompts(base, [s.caption for s in dataset])
    rng = generator(recipe.seed)
    idx = batch_schedule([s.repeats for s in dataset], recipe.batch_size, recipe.steps, rng)[0]
    t = torch.randint(0, 1000, (len(idx),), generator=rng)
    x0 = latents[idx]
    eps = torch.randn(x0.shape, generator=rng)
    alphas = DDPMScheduler.from_config(base.scheduler.config).alphas_cumprod
    a = alphas[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = base.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond[idx]).sample
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    loss, loss_eps = (pred - v).pow(2).mean().item(), (pred - eps).pow(2).mean().item()
    step, recorded = record["loss_ema"][0]
    assert step == 0
    assert recorded == pytest.approx(loss, rel=FLOAT32_FORWARD_RTOL, abs=1e-6)  # the record rounds to 6 digits
    assert abs(loss_eps - loss) > 10 * FLOAT32_FORWARD_RTOL * loss  # the target matters


def test_lds_outputs_of_a_v_model_are_the_velocity_error(sd2):
    pipe = _pipe(sd2.v, sd2.lora)
    x0, cond, keys = _rows(pipe, 2)
    settings = LDSSettings(output_timesteps=3, output_noise_draws=2)
    got = model_outputs(pipe, x0, cond, keys, settings)
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    for q in range(2):
        per_t = []
        for t in uniform_grid(3, 1000):
            noise = _output_noise(settings.output_seed, keys[q], t, 2, x0.shape[1:])
            xt = alphas[t].sqrt() * x0[q] + (1 - alphas[t]).sqrt() * noise
            with torch.no_grad():
                pred = pipe.unet(xt, torch.tensor([t, t]), encoder_hidden_states=cond[q].expand(2, -1, -1)).sample
            per_t.append((pred - _velocity(alphas, t, x0[q], noise)).pow(2).mean().item())
        assert got[q] == pytest.approx(np.mean(per_t), rel=FLOAT32_FORWARD_RTOL, abs=FLOAT32_FORWARD_ATOL), q


def test_a_manifest_naming_an_unknown_prediction_type_is_refused_on_open(tmp_path):
    FeatureStore.create(tmp_path / "s", {"lora": "a", "prediction_type": "epsilon"})
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["identity"]["prediction_type"] = "flow_prediction"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="identity.prediction_type"):
        FeatureStore.open(tmp_path / "s")
