"""Per-row LoRA gradients from one batched backward equal a plain autograd loop, row by row."""

from __future__ import annotations

import pytest
import torch

from das_sd.featurize.gradients import LoraGradientCapture, per_row_gradients
from das_sd.featurize.lora_layers import lora_parameters, num_lora_parameters
from das_sd.featurize.settings import noise_for, output_function
from das_sd.noising import noisy_latents
from das_sd.projection import BlockProjector, ProjectorSpec
from das_sd.registry import OUTPUT_FUNCTIONS
from tolerances import ALGEBRAIC_RTOL, relative_error

pytestmark = pytest.mark.numerics


def _inputs(pipe, rows: int):
    g = torch.Generator().manual_seed(1)
    dtype = pipe.unet.dtype
    x0 = torch.randn(rows, 4, 8, 8, generator=g).to(dtype)
    t = torch.tensor([0, 250, 600, 999, 37][:rows])
    noise = torch.stack([noise_for(0, f"k{i}", int(t[i]), (4, 8, 8)) for i in range(rows)]).to(dtype)
    ids = pipe.tokenizer(["a red circle on a blue background, zorblat"] * rows, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
    return x0, noise, t, cond


@pytest.mark.parametrize("output", OUTPUT_FUNCTIONS)
def test_batched_gradients_equal_one_row_at_a_time_autograd(lora_pipe64, output):
    unet = lora_pipe64.unet
    alphas = lora_pipe64.scheduler.alphas_cumprod.double()
    x0, noise, t, cond = _inputs(lora_pipe64, 4)
    params = lora_parameters(unet)
    # gradients a training loop has accumulated must survive featurizing in between
    accumulated = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    for p, g in zip(params, accumulated):
        p.grad = g.clone()
    batched = per_row_gradients(unet, x0, noise, t, cond, alphas, output)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, accumulated))
    for p in params:
        p.grad = None
    assert batched.shape == (4, sum(p.numel() for p in params))
    for i in range(4):
        a = alphas[t[i]]
        xt = a.sqrt() * x0[i:i + 1] + (1 - a).sqrt() * noise[i:i + 1]
        pred = unet(xt, t[i:i + 1], encoder_hidden_states=cond[i:i + 1]).sample
        value = output_function(output, pred, noise[i:i + 1]).sum()
        reference = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])
        assert relative_error(batched[i], reference) < ALGEBRAIC_RTOL, (output, i)


def test_noise_depends_only_on_seed_key_and_timestep():
    a = noise_for(0, "abc", 10, (4, 8, 8))
    assert torch.equal(a, noise_for(0, "abc", 10, (4, 8, 8)))
    for other in (noise_for(1, "abc", 10, (4, 8, 8)), noise_for(0, "abd", 10, (4, 8, 8)),
                  noise_for(0, "abc", 11, (4, 8, 8))):
        assert not torch.equal(a, other)


@pytest.mark.parametrize("group_bytes", [0, 50_000, 1 << 30])
def test_projected_gradients_equal_brute_force_projection(lora_pipe64, group_bytes):
    """Layers projected one by one (0), in groups cut mid-UNet (50 kB), or all at once."""
    unet = lora_pipe64.unet
    x0, noise, t, cond = _inputs(lora_pipe64, 3)
    num_params = num_lora_parameters(unet)
    projector = BlockProjector(ProjectorSpec("sparse", 64, 3, 4, block_rows=10_000), num_params)
    with LoraGradientCapture(unet) as capture:
        xt = noisy_latents(x0, noise, t, lora_pipe64.scheduler.alphas_cumprod)
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        capture.backward(output_function("l1", pred, noise).sum())
        full = capture.per_row_gradients()
        projected, sq_norm = capture.projected_gradients(projector, group_bytes)
    expected = full @ projector.dense().double()
    for i in range(3):
        assert relative_error(projected[i], expected[i]) < ALGEBRAIC_RTOL, i
    assert relative_error(sq_norm, full.pow(2).sum(1)) < ALGEBRAIC_RTOL


@pytest.fixture(scope="module", params=["sd15", "sd2"])
def locon_unet(request):
    """An SD 1.5- or SD 2.x-layout UNet in float64 with a LoCon-style LoRA: attention and feed-forward
    linears, the conv (SD 1.x) or linear (SD 2.x) proj_in/proj_out, ResNet 3x3 convs, 1x1 shortcuts,
    the stride-2 downsampler and the upsampler convs."""
    from sd_layouts import LOCON, add_random_lora, sd_unet

    torch.manual_seed(0)
    unet = sd_unet(request.param).double().eval()
    add_random_lora(unet, LOCON, rank=3, alpha=6.0, seed=1, dtype=torch.float64)
    return unet


@pytest.mark.parametrize("output", OUTPUT_FUNCTIONS)
def test_conv_lora_gradients_equal_one_row_at_a_time_autograd(locon_unet, output):
    from das_sd.featurize.lora_layers import lora_inventory

    unet = locon_unet
    kinds = lora_inventory(unet).record()["differentiated"]
    assert {"conv3x3", "linear"} <= set(kinds) and not lora_inventory(unet).left_out
    strided = [m for n, m in unet.named_modules() if n.endswith("downsamplers.0.conv.lora_A.default")]
    assert strided and all(m.stride == (2, 2) and m.padding == (1, 1) for m in strided)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 400, 999])
    cond = torch.randn(3, 5, 32, generator=g, dtype=torch.float64)
    alphas = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)
    params = lora_parameters(unet)
    batched = per_row_gradients(unet, x0, noise, t, cond, alphas, output)
    assert batched.shape == (3, sum(p.numel() for p in params)) == (3, num_lora_parameters(unet))
    for i in range(3):
        xt = noisy_latents(x0[i:i + 1], noise[i:i + 1], t[i:i + 1], alphas)
        pred = unet(xt, t[i:i + 1], encoder_hidden_states=cond[i:i + 1]).sample
        value = output_function(output, pred, noise[i:i + 1]).sum()
        reference = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])
        assert relative_error(batched[i], reference) < ALGEBRAIC_RTOL, (output, i)
