from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Nothing may be fetched: every model and dataset comes from the package or the test itself.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# CI's machine has 2 cores; OMP_NUM_THREADS=1 reruns the numerical tests with other reduction orders
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session", autouse=True)
def das_sd_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("das_sd_home")
    os.environ["DAS_SD_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def base_path() -> Path:
    from das_sd.models.loading import embedded_base_path

    return embedded_base_path()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from das_sd.toy.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture()
def pipe(base_path):
    """A fresh embedded pipeline (tests may load LoRAs into it)."""
    from das_sd.models.loading import load_pipeline

    return load_pipeline(base_path, device="cpu")


def _random_lora_pipe(base_path, dtype: torch.dtype):
    from das_sd.featurize.lora_layers import lora_parameters
    from das_sd.models.loading import load_pipeline
    from das_sd.lora_record import LoraRecipe
    from das_sd.train import add_lora_adapter

    pipe = load_pipeline(base_path, device="cpu", dtype=dtype)
    add_lora_adapter(pipe.unet, LoraRecipe(rank=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pipe.unet.eval()
    return pipe


@pytest.fixture(scope="module")
def lora_pipe(base_path):
    """The embedded pipeline with a random rank-2 LoRA (B != 0, so every LoRA gradient is non-zero)."""
    return _random_lora_pipe(base_path, torch.float32)


@pytest.fixture(scope="module")
def lora_pipe64(base_path):
    """``lora_pipe`` in float64, for claims that are algebraic (batched = one-by-one, projected =
    P^T brute force): see tests/tolerances.py for why they are not checked in float32."""
    return _random_lora_pipe(base_path, torch.float64)


@pytest.fixture(scope="session")
def demo(das_sd_home) -> dict:
    """The prepared demo: data, LoRA, feature store and index under this session's DAS_SD_HOME."""
    from das_sd.toy.demo import prepare_demo

    return prepare_demo(progress=False)


@pytest.fixture(scope="session")
def sdxl_demo(das_sd_home, tmp_path_factory) -> dict:
    """An SDXL-layout base folder, a LoRA trained on a few demo images, and its store and index
    (tests/sdxl_store.py)."""
    from sdxl_store import build_sdxl_store

    return build_sdxl_store(tmp_path_factory.mktemp("sdxl"))
