"""Per-row LoRA gradients from one batched backward equal a plain autograd loop, row by row."""

from __future__ import annotations

import pytest
import torch

from das_sd.featurize.gradients import lora_parameters, per_row_gradients
from das_sd.featurize.settings import OUTPUT_FUNCTIONS, noise_for, output_function


def _inputs(pipe, rows: int):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(rows, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999, 37][:rows])
    noise = torch.stack([noise_for(0, f"k{i}", int(t[i]), (4, 8, 8)) for i in range(rows)])
    ids = pipe.tokenizer(["a red circle on a blue background, zorblat"] * rows, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
    return x0, noise, t, cond


@pytest.mark.parametrize("output", OUTPUT_FUNCTIONS)
def test_batched_gradients_equal_one_row_at_a_time_autograd(lora_pipe, output):
    unet = lora_pipe.unet
    alphas = lora_pipe.scheduler.alphas_cumprod
    x0, noise, t, cond = _inputs(lora_pipe, 4)
    params = lora_parameters(unet)
    # gradients a training loop has accumulated must survive featurizing in between
    accumulated = [torch.randn(p.shape) for p in params]
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
        err = (batched[i] - reference).norm() / reference.norm()
        assert err < 1e-4, (output, i, err.item())


def test_noise_depends_only_on_seed_key_and_timestep():
    a = noise_for(0, "abc", 10, (4, 8, 8))
    assert torch.equal(a, noise_for(0, "abc", 10, (4, 8, 8)))
    for other in (noise_for(1, "abc", 10, (4, 8, 8)), noise_for(0, "abd", 10, (4, 8, 8)),
                  noise_for(0, "abc", 11, (4, 8, 8))):
        assert not torch.equal(a, other)
