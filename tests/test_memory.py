"""Memory budgets cut a batch's rows into passes without changing the features."""
from __future__ import annotations

import argparse

import pytest
import torch

import das_sd.featurize.featurizer as featurizer_module
from das_sd.argtypes import memory_size
from das_sd.featurize.featurizer import Featurizer
from das_sd.memory import HEADROOM, parse_memory_size, rows_per_pass, saved_bytes
from das_sd.featurize.settings import FeaturizerSettings
from tolerances import ALGEBRAIC_RTOL, FLOAT32_FORWARD_RTOL, relative_error


@pytest.mark.parametrize("text, expected", [("24GB", 24 << 30), ("512MiB", 512 << 20), ("1.5g", 3 << 29),
                                            ("4096", 4096), ("2 tb", 2 << 40), ("64k", 64 << 10)])
def test_memory_sizes_read_as_users_write_them(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["", "0GB", "-1G", "12 parsecs", "GB", "1e3"])
def test_bad_memory_sizes_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match="is not a memory size"):
        parse_memory_size(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        memory_size(bad)


def test_saved_bytes_counts_each_storage_autograd_keeps_once():
    x = torch.randn(1000, requires_grad=True)
    assert saved_bytes(lambda: x.exp().sum()) == 4000  # exp keeps its output; sum keeps nothing
    assert saved_bytes(lambda: (x * x).sum()) == 4000  # x saved twice, one storage
    y = torch.randn(250, dtype=torch.float64, requires_grad=True)
    assert saved_bytes(lambda: (x.exp().sum() + y.sin().sum())) == 4000 + 2000


def test_rows_per_pass_fills_the_budget_within_bounds():
    assert rows_per_pass(budget=int(HEADROOM * 100) * 7, bytes_per_row=100, rows=50) == 7
    assert rows_per_pass(budget=1, bytes_per_row=100, rows=50) == 1  # never zero rows
    assert rows_per_pass(budget=1 << 40, bytes_per_row=100, rows=50) == 50


@pytest.mark.numerics
def test_features_and_residuals_do_not_depend_on_the_memory_budget(lora_pipe64, monkeypatch):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(3, 77, lora_pipe64.text_encoder.config.hidden_size, generator=g, dtype=torch.float64)
    keys = ["a", "b", "c"]
    settings = FeaturizerSettings(num_timesteps=4, projection_dim=64, residual_timesteps=8)
    calls = []
    real = featurizer_module.projected_row_gradients
    monkeypatch.setattr(featurizer_module, "projected_row_gradients",
                        lambda unet, heads, x0, *a, **k: calls.append(len(x0)) or real(unet, heads, x0, *a, **k))
    whole = Featurizer(lora_pipe64, settings)  # the free memory holds 12 tiny rows
    phi, e = whole.features(x0, cond, keys), whole.residuals(x0, cond, keys)
    assert calls == [12]
    row = whole._row_bytes[next(iter(whole._row_bytes))]
    assert row > 0
    for budget, expected in ((1, [1] * 12), (int(HEADROOM * row * 5), [5, 5, 2])):
        calls.clear()
        cut = Featurizer(lora_pipe64, settings, max_memory=budget)
        phi_cut, e_cut = cut.features(x0, cond, keys), cut.residuals(x0, cond, keys)
        assert calls == expected
        for i in range(3):
            assert relative_error(phi_cut[i], phi[i]) < ALGEBRAIC_RTOL, (budget, i)
        # residuals run in float32 whatever the UNet: equal up to how rows share a kernel call
        assert torch.allclose(e_cut, e, rtol=FLOAT32_FORWARD_RTOL), budget


def test_the_vae_encodes_fewer_images_per_call_within_a_budget(pipe, demo_data, monkeypatch):
    from das_sd.data.datasets import open_dataset
    from das_sd.latents import encode_images

    dataset = open_dataset(demo_data)
    samples = dataset.samples[:5]
    calls = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x: calls.append(len(x)) or encode(x))
    whole = encode_images(pipe, dataset, 32, samples=samples)
    assert calls[1:] == [5]  # the first call measures one image
    calls.clear()
    cut = encode_images(pipe, dataset, 32, samples=samples, max_memory=1)
    assert calls[1:] == [1] * 5
    assert torch.allclose(cut, whole, rtol=FLOAT32_FORWARD_RTOL, atol=FLOAT32_FORWARD_RTOL * whole.abs().max())
