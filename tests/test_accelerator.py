"""The CUDA path against the CPU path: skipped without a GPU (CI has none).

`benchmarks/device_check.sh` runs this file on a machine with one. ``DAS_SD_TEST_ACCELERATOR=cpu``
runs it with the CPU standing in for the accelerator, which checks the tests' own plumbing only.
Tolerances allow for TF32 convolutions (cuDNN's default) and other kernels summing in another order.
"""

from __future__ import annotations

import os

import pytest
import torch

from das_sd.featurize.featurizer import Featurizer, features_together
from das_sd.featurize.settings import FeaturizerSettings
from das_sd.projection import BlockProjector, ProjectorSpec

DEVICE = os.environ.get("DAS_SD_TEST_ACCELERATOR", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device")


def _demo_lora_pipe(base_path, device: str):
    from das_sd.models.loading import embedded_demo_lora_path, load_lora, load_pipeline

    pipe = load_pipeline(base_path, device=device)
    load_lora(pipe, embedded_demo_lora_path())
    return pipe


def _queries(pipe, n: int):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    ids = pipe.tokenizer([f"a zorblat pattern, picture {i}" for i in range(n)], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids.to(pipe.device))[0].cpu()
    return x0, cond, [f"q{i}" for i in range(n)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().double() - b.cpu().double()).norm(dim=1) / b.cpu().double().norm(dim=1)


@pytest.fixture(scope="module")
def pipes(base_path):
    return _demo_lora_pipe(base_path, "cpu"), _demo_lora_pipe(base_path, DEVICE)


def test_features_on_the_device_equal_the_cpus(pipes):
    cpu, dev = pipes
    settings = FeaturizerSettings(num_timesteps=5, projection_dim=512)
    x0, cond, keys = _queries(cpu, 4)
    sets = [settings, FeaturizerSettings(num_timesteps=5, projection_dim=512, output="square", normalize=False)]
    on_cpu = features_together([Featurizer(cpu, s) for s in sets], x0, cond, keys)
    on_dev = features_together([Featurizer(dev, s) for s in sets], x0, cond, keys)
    for a, b in zip(on_dev, on_cpu):
        assert a.device.type == torch.device(DEVICE).type
        assert (_rel(a, b) < 1e-2).all(), _rel(a, b)
    r_cpu = Featurizer(cpu, settings).residuals(x0, cond, keys)
    r_dev = Featurizer(dev, settings).residuals(x0, cond, keys)
    assert torch.allclose(r_dev.cpu(), r_cpu, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_device_stays_close(pipes, dtype):
    cpu, dev = pipes
    if dtype == torch.float16 and not DEVICE.startswith("cuda"):
        pytest.skip("float16 autocast is offered on CUDA only")
    settings = FeaturizerSettings(num_timesteps=5, projection_dim=512)
    x0, cond, keys = _queries(cpu, 4)
    exact = Featurizer(cpu, settings).features(x0, cond, keys)
    half = Featurizer(dev, settings, dtype).features(x0, cond, keys)
    assert (_rel(half, exact) > 1e-4).all()  # it really ran in half precision
    assert (_rel(half, exact) < 0.1).all(), _rel(half, exact)


def test_sparse_projection_on_the_device_equals_the_cpus():
    spec = ProjectorSpec(kind="sparse", dim=256, seed=5, block_rows=1000)
    g = torch.randn(6, 5000, generator=torch.Generator().manual_seed(4))
    on_cpu = BlockProjector(spec, 5000).project(g)
    on_dev = BlockProjector(spec, 5000, device=DEVICE).project(g.to(DEVICE))
    assert torch.allclose(on_dev.cpu(), on_cpu, rtol=1e-5, atol=1e-6)


def test_attribution_on_the_device_ranks_like_the_cpu(demo):
    from das_sd.attribute import Attributor
    from das_sd.topk import stream_topk

    on_cpu = Attributor(demo["store"], device="cpu")
    on_dev = Attributor(demo["store"], device=DEVICE)
    prompts = ["a zorblat pattern", "a quimvex motif in blue", "a red circle"]
    g = torch.Generator().manual_seed(1)
    size = on_cpu.resolution // on_cpu.pipe.vae_scale_factor
    latents = torch.randn(len(prompts), 4, size, size, generator=g)
    for method in ("das", "dtrak"):
        a = on_cpu.attribute_latents(latents, prompts, method, 10)
        b = on_dev.attribute_latents(latents, prompts, method, 10)
        for x, y in zip(a, b):
            overlap = len({r.key for r in x.results} & {r.key for r in y.results})
            assert overlap >= 9, (method, overlap)
    # streamed top-k over the store's files, scored on the device, equals the CPU's
    q = on_cpu.query_features(latents, prompts, feature_sets=["das"])["das"]
    top_cpu = stream_topk(on_cpu.store, "das", q, top_k=10)
    top_dev = stream_topk(on_cpu.store, "das", q, top_k=10, device=DEVICE)
    assert torch.equal(top_dev.indices.cpu(), top_cpu.indices)
    assert torch.allclose(top_dev.scores.cpu(), top_cpu.scores, rtol=1e-4)
