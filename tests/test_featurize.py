"""Projected features equal P^T of brute-force per-sample gradients, independent of batching."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler

from das_sd.featurize.featurizer import Featurizer, autocast_supported, features_together, store_autocast
from das_sd.featurize.lora_layers import lora_parameters
from das_sd.featurize.settings import FeaturizerSettings, noise_for, uniform_grid
from tolerances import ALGEBRAIC_RTOL, FLOAT32_FORWARD_RTOL, relative_error

pytestmark = pytest.mark.numerics


def _queries(pipe, n: int):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(n, 4, 8, 8, generator=g).to(pipe.unet.dtype)
    captions = [f"a red circle on a blue background, zorblat {i}" for i in range(n)]
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
    return x0, cond, [f"key{i}" for i in range(n)]


def _brute_force_mean_gradient(pipe, settings, x0, cond, key):
    """One sample, one timestep at a time, plain autograd; independent of das_sd's batching code."""
    unet, params = pipe.unet, lora_parameters(pipe.unet)
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.to(unet.dtype)
    total = None
    timesteps = uniform_grid(settings.num_timesteps, 1000)
    for t in timesteps:
        eps = noise_for(settings.noise_seed, key, t, (4, 8, 8)).unsqueeze(0).to(unet.dtype)
        xt = alphas[t].sqrt() * x0.unsqueeze(0) + (1 - alphas[t]).sqrt() * eps
        pred = unet(xt, torch.tensor([t]), encoder_hidden_states=cond.unsqueeze(0)).sample
        f = {"mean": pred.mean(), "l1": pred.abs().mean(), "square": (pred ** 2).mean(),
             "loss": ((pred - eps) ** 2).mean()}[settings.output]
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(f, params)])
        if settings.normalize:
            g = g / g.norm()
        total = g if total is None else total + g
    return total / len(timesteps)


@pytest.mark.parametrize("output,normalize,projector", [
    (output, normalize, "sparse") for output in ("mean", "l1", "square", "loss") for normalize in (True, False)
] + [("l1", True, "rademacher"), ("loss", False, "gaussian")])
def test_features_equal_projected_brute_force_gradients(lora_pipe64, output, normalize, projector):
    """An algebraic claim, checked in float64 (tests/tolerances.py: in float32, f = l1's sign flips
    near 0 make any bound a gamble)."""
    settings = FeaturizerSettings(output=output, normalize=normalize, num_timesteps=3, projection_dim=128,
                                  projector=projector)
    featurizer = Featurizer(lora_pipe64, settings)
    x0, cond, keys = _queries(lora_pipe64, 3)
    phi = featurizer.features(x0, cond, keys)
    assert phi.dtype == torch.float64
    dense = featurizer.projector.dense().double()
    for i in range(3):
        expected = _brute_force_mean_gradient(lora_pipe64, settings, x0[i], cond[i], keys[i]) @ dense
        assert relative_error(phi[i], expected) < ALGEBRAIC_RTOL, (output, normalize, i)


def test_features_do_not_depend_on_batch_size_or_order(lora_pipe64):
    featurizer = Featurizer(lora_pipe64, FeaturizerSettings(num_timesteps=4, projection_dim=64))
    x0, cond, keys = _queries(lora_pipe64, 7)
    all_at_once = featurizer.features(x0, cond, keys)
    one_by_one = torch.cat([featurizer.features(x0[i:i + 1], cond[i:i + 1], keys[i:i + 1]) for i in range(7)])
    perm = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    shuffled = featurizer.features(x0[perm], cond[perm], [keys[i] for i in perm])
    for i in range(7):
        assert relative_error(one_by_one[i], all_at_once[i]) < ALGEBRAIC_RTOL, i
        assert relative_error(shuffled[i], all_at_once[perm[i]]) < ALGEBRAIC_RTOL, i
    r_all = featurizer.residuals(x0, cond, keys)
    r_one = torch.cat([featurizer.residuals(x0[i:i + 1], cond[i:i + 1], keys[i:i + 1]) for i in range(7)])
    assert torch.allclose(r_all, r_one, rtol=FLOAT32_FORWARD_RTOL)  # residuals are float32 whatever the UNet


def test_residual_forms(lora_pipe):
    x0, cond, keys = _queries(lora_pipe, 2)
    make = lambda form: Featurizer(lora_pipe, FeaturizerSettings(residual=form, residual_timesteps=8, projection_dim=8))
    assert torch.equal(make("none").residuals(x0, cond, keys), torch.ones(2))
    magnitude = make("magnitude").residuals(x0, cond, keys)
    scale_free = make("scale-free").residuals(x0, cond, keys)
    # brute force r_{i,t} for sample 0
    alphas = DDPMScheduler.from_config(lora_pipe.scheduler.config).alphas_cumprod
    r = []
    with torch.no_grad():
        for t in uniform_grid(8, 1000):
            eps = noise_for(0, keys[0], t, (4, 8, 8)).unsqueeze(0)
            xt = alphas[t].sqrt() * x0[:1] + (1 - alphas[t]).sqrt() * eps
            pred = lora_pipe.unet(xt, torch.tensor([t]), encoder_hidden_states=cond[:1]).sample
            r.append(((pred - eps) ** 2).mean().sqrt())
    r = torch.stack(r)
    assert torch.allclose(magnitude[0], r.mean(), rtol=FLOAT32_FORWARD_RTOL)
    assert torch.allclose(scale_free[0], (r / r.norm()).mean(), rtol=FLOAT32_FORWARD_RTOL)
    assert 0 < scale_free[0] <= 1 / 8 ** 0.5 + 1e-6  # mean of a unit vector's entries


def test_settings_validation():
    with pytest.raises(ValueError, match="output function"):
        FeaturizerSettings(output="max")
    with pytest.raises(ValueError, match="residual form"):
        FeaturizerSettings(residual="log")
    assert uniform_grid(10, 1000)[0] == 0 and uniform_grid(10, 1000)[-1] == 999


def test_bfloat16_autocast_on_the_cpu_approximates_float32(base_path):
    """With the trained demo LoRA (a random LoRA perturbs the model far more than training does, and
    bfloat16 rounding flips the signs of near-zero predictions under f = l1)."""
    from das_sd.models.loading import embedded_demo_lora_path, load_lora, load_pipeline

    pipe = load_pipeline(base_path, device="cpu")
    load_lora(pipe, embedded_demo_lora_path())
    settings = FeaturizerSettings(num_timesteps=3, projection_dim=512)
    x0, cond, keys = _queries(pipe, 4)
    exact = Featurizer(pipe, settings).features(x0, cond, keys)
    bf16 = Featurizer(pipe, settings, torch.bfloat16).features(x0, cond, keys)
    err = (bf16 - exact).norm(dim=1) / exact.norm(dim=1)
    assert (err > 1e-4).all(), err  # the passes really ran in bfloat16 (float32 reruns agree to ~1e-7)
    assert (err < 0.1).all(), err  # 0.012-0.055 here


def test_autocast_follows_the_store_where_the_device_offers_it(monkeypatch):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda amx=probe == "_is_amx_tile_supported": amx, raising=False)
    assert store_autocast("float32", "cpu") is None
    assert store_autocast("bfloat16", "cpu") is torch.bfloat16  # AMX
    assert store_autocast("float16", "cpu") is None  # a CUDA float16 store queried on a CPU: float32
    assert store_autocast("float16", "cuda") is torch.float16
    assert not autocast_supported(torch.float16, "cpu") and autocast_supported(torch.bfloat16, "cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert store_autocast("bfloat16", "cpu") is None  # emulated bfloat16 would be slower: float32
    assert store_autocast("bfloat16", "cuda") is torch.bfloat16


def test_feature_sets_sharing_a_forward_pass_equal_separate_ones(lora_pipe64):
    base = FeaturizerSettings(num_timesteps=3, projection_dim=64)
    sets = [base, replace(base, output="square", normalize=False), replace(base, output="loss", normalize=False),
            replace(base, num_timesteps=2), replace(base, noise_seed=7)]  # the last two: groups of their own
    featurizers = [Featurizer(lora_pipe64, s) for s in sets]
    x0, cond, keys = _queries(lora_pipe64, 3)
    together = features_together(featurizers, x0, cond, keys)
    for featurizer, phi in zip(featurizers, together):
        alone = featurizer.features(x0, cond, keys)
        for i in range(3):
            assert relative_error(phi[i], alone[i]) < ALGEBRAIC_RTOL, featurizer.settings
    assert not torch.allclose(together[0], together[4])  # another noise seed: other rows


def test_featurizing_puts_the_unet_in_eval_mode_for_the_call_only(lora_pipe):
    """The UNet is the caller's: eval mode (no dropout, independent rows) while features and
    residuals are computed, the caller's own (here mixed) modes before and after."""
    unet = lora_pipe.unet
    during = []
    handle = unet.register_forward_pre_hook(lambda m, _: during.append(any(x.training for x in m.modules())))
    unet.train()
    unet.conv_in.eval()
    modes = [(m, m.training) for m in unet.modules()]
    try:
        featurizer = Featurizer(lora_pipe, FeaturizerSettings(num_timesteps=2, projection_dim=8, residual_timesteps=2))
        assert [m.training for m, _ in modes] == [t for _, t in modes]  # constructing switches nothing
        x0, cond, keys = _queries(lora_pipe, 1)
        featurizer.features(x0, cond, keys)
        featurizer.residuals(x0, cond, keys)
        # three forwards: one row measured for the memory budget, the features, the residuals
        assert len(during) == 3 and not any(during)
        assert [m.training for m, _ in modes] == [t for _, t in modes]
    finally:
        handle.remove()
        unet.eval()


def test_residuals_shared_with_the_featurizing_forward_equal_their_own_pass(lora_pipe64, monkeypatch):
    import das_sd.featurize.featurizer as featurizer_module
    from das_sd.featurize.featurizer import features_and_residuals

    x0, cond, keys = _queries(lora_pipe64, 3)
    for form in ("scale-free", "magnitude"):
        shared = Featurizer(lora_pipe64, FeaturizerSettings(num_timesteps=4, projection_dim=64, residual=form))
        assert shared.settings.shares_forward and shared.settings.residual_timesteps == 0
        alone = shared.residuals(x0, cond, keys)  # its own no-grad forward over the feature timesteps
        unet_calls = []
        monkeypatch.setattr(featurizer_module.Featurizer, "_residual_rows",
                            lambda *a, **k: unet_calls.append(1) or pytest.fail("an extra residual forward"))
        phi, [e] = features_and_residuals([shared], x0, cond, keys)
        monkeypatch.undo()
        assert not unet_calls and torch.allclose(phi[0], shared.features(x0, cond, keys), rtol=0, atol=0)
        assert torch.allclose(e, alone, rtol=FLOAT32_FORWARD_RTOL), form
    own = Featurizer(lora_pipe64, FeaturizerSettings(num_timesteps=4, projection_dim=64, residual_timesteps=6))
    assert not own.settings.shares_forward and len(own.settings.residual_grid(1000)) == 6
    _, [e_own] = features_and_residuals([own], x0, cond, keys)
    assert torch.equal(e_own, own.residuals(x0, cond, keys))


def _brute_force_signed_residual(pipe, settings, x0, cond, key):
    """u of one sample (docs/method.md §9), a timestep at a time with plain autograd: the gradient of
    L_simple / 2 = mean((pred - eps)^2) / 2 (= J^T r / D), divided by the norm of the same row's f
    gradient when the settings normalise, averaged over T_K; independent of the stop-gradient head."""
    unet, params = pipe.unet, lora_parameters(pipe.unet)
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.to(unet.dtype)
    timesteps = uniform_grid(settings.num_timesteps, 1000)
    total = 0
    for t in timesteps:
        eps = noise_for(settings.noise_seed, key, t, (4, 8, 8)).unsqueeze(0).to(unet.dtype)
        xt = alphas[t].sqrt() * x0.unsqueeze(0) + (1 - alphas[t]).sqrt() * eps
        pred = unet(xt, torch.tensor([t]), encoder_hidden_states=cond.unsqueeze(0)).sample
        half_loss = 0.5 * ((pred - eps) ** 2).mean()
        g_loss = torch.cat([x.reshape(-1) for x in torch.autograd.grad(half_loss, params, retain_graph=True)])
        g_f = torch.cat([x.reshape(-1) for x in torch.autograd.grad(pred.abs().mean(), params)])
        total = total + (g_loss / g_f.norm() if settings.normalize else g_loss)
    return total / len(timesteps)


@pytest.mark.parametrize("normalize", [True, False])
def test_signed_residual_equals_projected_brute_force_loss_gradients(lora_pipe64, normalize):
    """The signed form's u_i from the shared forward's extra backward = P^T of a per-row autograd
    loop; the features beside it, and a second feature set sharing the forward, are unchanged."""
    from das_sd.featurize.featurizer import features_and_residuals

    settings = FeaturizerSettings(num_timesteps=3, projection_dim=128, residual="signed", normalize=normalize)
    signed = Featurizer(lora_pipe64, settings)
    other = Featurizer(lora_pipe64, replace(settings, output="square", normalize=False, residual="none"))
    x0, cond, keys = _queries(lora_pipe64, 3)
    (phi, phi_other), (u, e_other) = features_and_residuals([signed, other], x0, cond, keys)
    assert u.shape == (3, 128) and u.dtype == torch.float64 and torch.equal(e_other, torch.ones(3))
    dense = signed.projector.dense().double()
    for i in range(3):
        expected = _brute_force_signed_residual(lora_pipe64, settings, x0[i], cond[i], keys[i]) @ dense
        assert relative_error(u[i], expected) < ALGEBRAIC_RTOL, (normalize, i)
    assert relative_error(phi, signed.features(x0, cond, keys)) < ALGEBRAIC_RTOL
    assert relative_error(phi_other, other.features(x0, cond, keys)) < ALGEBRAIC_RTOL
    with pytest.raises(ValueError, match="features_and_residuals"):
        signed.residuals(x0, cond, keys)


def test_signed_residual_needs_the_feature_timesteps():
    with pytest.raises(ValueError, match="residual_timesteps .*--residual-timesteps 5.* must be 0"):
        FeaturizerSettings(residual="signed", residual_timesteps=5)
