"""Helpers shared by several test modules."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

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
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


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
