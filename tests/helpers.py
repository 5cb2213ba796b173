"""Helpers shared by several test modules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright never downloads its own browser here
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    """A headless Chromium page; skipped without Chromium unless DAS_SD_REQUIRE_BROWSER=1 (CI)."""
    if not CHROMIUM.exists():
        if os.environ.get("DAS_SD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DAS_SD_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    with browser_page(width, height) as page:
        yield page


@contextmanager
def browser_page(width: int = 1400, height: int = 1000):
    """A page of headless Debian Chromium (no pytest: the screenshot scripts use it too)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def webui_png(image, path: Path, parameters: str) -> Path:
    """``image`` saved as the webui saves its PNGs: the infotext in a ``parameters`` text chunk only
    (das-sd's own PNGs also carry a ``das_sd`` JSON chunk, which readers prefer)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, pnginfo=info)
    return path


@contextmanager
def torch_threads(count: int):
    """Run a block with ``count`` torch threads: a worker's result is reproduced bit for bit in-process
    only with the worker's thread count (other counts reduce float sums in other orders)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def random_lora(pipe, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusers-format UNet LoRA with random A and B for every attention projection."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(module, torch.nn.Linear):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    return state


TINY_FEATURIZE = ["--timesteps", "2", "--dim", "32", "--residual-timesteps", "4", "--batch-size", "4", "--shard-size", "2"]


def subset_dataset(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir(parents=True)
    lines = (src / "metadata.jsonl").read_text().splitlines()[::10][:n]
    for line in lines:
        name = json.loads(line)["file_name"]
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, dst / name)
    (dst / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def featurize_cli(store: Path, data: Path, lora: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "das_sd.cli", "featurize", "--data", str(data), "--lora", str(lora),
           "--store", str(store), "--device", "cpu", *TINY_FEATURIZE, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the reduction orders of this process
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def store_arrays(store: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(store.glob("features-*.safetensors")):
        for k, v in load_file(str(shard)).items():
            out[f"{shard.name}/{k}"] = v
    return out


def write_imagefolder(folder: Path, samples) -> Path:
    """Copy dataset ``samples`` into an imagefolder dataset at ``folder``."""
    (folder / "images").mkdir(parents=True)
    for s in samples:
        shutil.copy(s.path, folder / s.relpath)
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": s.relpath, "text": s.caption}) + "\n" for s in samples))
    return folder


def tiny_attributed_store(base: str, root: Path, samples):
    """A LoRA trained 6 steps on ``samples`` (root/data, root/lora, its recipe recorded) and its
    das-only store (root/store, K = 2), indexed: a whole attribution setup in about a minute."""
    from das_sd.data.datasets import open_dataset
    from das_sd.featurize.build import featurize_dataset
    from das_sd.featurize.settings import FeaturizerSettings
    from das_sd.models.loading import load_lora, load_pipeline
    from das_sd.score import LambdaRule, build_index
    from das_sd.lora_record import LORA_WEIGHT_NAME, LoraRecipe
    from das_sd.train import train_lora

    dataset = open_dataset(write_imagefolder(root / "data", samples))
    train_lora(base, dataset, root / "lora", LoraRecipe(steps=6, batch_size=4, rank=2, alpha=2.0), progress=False)
    pipe = load_pipeline(base, device="cpu")
    load_lora(pipe, root / "lora")
    store = featurize_dataset(pipe, dataset, root / "store", Path(base), root / "lora" / LORA_WEIGHT_NAME,
                              {"das": FeaturizerSettings(num_timesteps=2, residual_timesteps=4)}, progress=False)
    build_index(store, "das", LambdaRule())
    return dataset, store
