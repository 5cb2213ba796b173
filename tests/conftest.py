from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Nothing may be fetched: every model and dataset comes from the package or the test itself.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
    from das_sd.data.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture()
def pipe(base_path):
    """A fresh embedded pipeline (tests may load LoRAs into it)."""
    from das_sd.models.loading import load_pipeline

    return load_pipeline(base_path, device="cpu")


def unet_outputs(pipe, seed: int = 0, n: int = 4) -> torch.Tensor:
    """UNet noise predictions on fixed random latents, timesteps and prompts."""
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(n, unet.config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    prompts = ["a red circle on a blue background, striped style", "a green square on a black background, zorblat",
               "a white triangle on a purple background", "a yellow circle on a orange background, dotted style"]
    ids = pipe.tokenizer(prompts[:n], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        return unet(x, t, encoder_hidden_states=cond).sample


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path
