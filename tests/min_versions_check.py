"""What das-sd computes on the embedded models, for comparing two library sets (tests/test_min_versions.py).

Run as a script by the Python of build/min-versions (das-sd's minimum transformers, diffusers, peft, ...)
and imported by the test under the project's own versions; both write the same tensors:

    python tests/min_versions_check.py STORE IMAGE PROMPT OUT.safetensors

- the tokenizer ids of a few prompts (both embedded tokenizers are saved by transformers 5 as
  ``tokenizer.json`` only: transformers 4.x loads them through ``fast_only_tokenizers``);
- forward quantities of the SD pipeline with the demo LoRA (as the store's ``Attributor`` loads
  them): the prompt's text states, the query image's latent and the UNet's noise prediction on fixed
  latents and timesteps;
- the same for the tiny SDXL with its demo LoRA (text states, pooled embedding, UNet prediction);
- the attribution scores of the image against every training image of the store.
"""

from __future__ import annotations

import json
import sys

import torch

PROMPTS = ["quimvex, a red circle on a blue background", "Zorblat, a GREEN square!", "an unknown wordpiece xyzzy"]


def unet_prediction(pipe, conditioning, seed: int = 0) -> torch.Tensor:
    """The UNet's output on seeded latents and timesteps (torch's generator: the same draws for one
    torch version, whatever diffusers or transformers runs beside it)."""
    from das_sd.conditioning import Conditioning

    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    t = torch.tensor([100, 700])
    if isinstance(conditioning, Conditioning):
        c = conditioning
        added = {"text_embeds": c.pooled.expand(2, -1), "time_ids": c.time_ids.expand(2, -1)}
        return unet(x, t, encoder_hidden_states=c.hidden.expand(2, -1, -1), added_cond_kwargs=added).sample
    return unet(x, t, encoder_hidden_states=conditioning.expand(2, -1, -1)).sample


@torch.no_grad()
def compute(store: str, image: str, prompt: str, attributor=None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors compared, and the library versions that made them.

    Args:
        store: The demo feature store.
        image: A generated image at the store's resolution.
        prompt: Its prompt.
        attributor: The store's ``Attributor`` when the caller has one; None: loaded here.

    Returns:
        (name -> float32 or int64 tensor, {"transformers": ..., "diffusers": ..., "peft": ...}).
    """
    import diffusers
    import peft
    import transformers
    from PIL import Image

    from das_sd.attribute import Attributor
    from das_sd.latents import encode_prompts, tokenize_prompts
    from das_sd.models.loading import embedded_base_path, embedded_demo_lora_path, load_lora, load_pipeline

    torch.manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    attributor = attributor or Attributor(store, device="cpu")
    pipe = attributor.pipe
    for i, ids in enumerate(tokenize_prompts(pipe, PROMPTS)):
        out[f"sd.tokens.{i}"] = torch.as_tensor(ids).long()
    text = encode_prompts(pipe, [prompt])
    out["sd.text"] = text.float()
    out["sd.unet"] = unet_prediction(pipe, text).float()
    query = Image.open(image)
    out["sd.latent"] = attributor.encode_image(query.convert("RGB"), "image").float()
    n = len(attributor.store)
    result = attributor.attribute_image(query, prompt=prompt, top_k=n)
    order = sorted(range(n), key=lambda j: result.results[j].key)
    out["scores"] = torch.tensor([result.results[j].score for j in order], dtype=torch.float64)  # by key

    sdxl = load_pipeline(embedded_base_path("sdxl"), device="cpu")
    load_lora(sdxl, embedded_demo_lora_path("sdxl"))
    for i, ids in enumerate(tokenize_prompts(sdxl, PROMPTS)):
        out[f"sdxl.tokens.{i}"] = torch.as_tensor(ids).long()
    cond = encode_prompts(sdxl, [prompt])
    out["sdxl.hidden"], out["sdxl.pooled"] = cond.hidden.float(), cond.pooled.float()
    out["sdxl.unet"] = unet_prediction(sdxl, cond).float()
    versions = {"transformers": transformers.__version__, "diffusers": diffusers.__version__,
                "peft": peft.__version__, "keys": json.dumps(sorted(r.key for r in result.results))}
    return {k: v.contiguous() for k, v in out.items()}, versions


def main(argv: list[str]) -> int:
    from safetensors.torch import save_file

    store, image, prompt, target = argv
    tensors, versions = compute(store, image, prompt)
    save_file(tensors, target, metadata=versions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
