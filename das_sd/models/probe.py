"""Weight probes: tell whether a loaded pipeline holds the base and LoRA a store was built with.

File fingerprints identify files, but a pipeline handed to das-sd by a host (diffusers, a webui) was
loaded from somewhere das-sd cannot see, in any LoRA format and dtype. A probe looks at the weights
themselves: for each linear layer W, a few random bilinear forms u^T W v (u, v seeded by the layer
name), normalised by |u| |v|. For a LoRA the layer is the effective update scaling * B A, probed
as (u^T B)(A v) without forming it (a conv LoRA's factors flattened to matrices). Two loads of the
same weights agree to rounding (fp16 included); a different model or LoRA differs at order one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..seeds import generator

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

PAIRS = 4
TOLERANCE = 2e-2  # relative, per layer; fp16 weights land near 1e-3


def _vectors(name: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(f"das-sd-probe:{name}", drop_low_bit=True)
    u = torch.randn(PAIRS, rows, generator=g, dtype=torch.float64) / math.sqrt(rows)
    v = torch.randn(PAIRS, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)
    return u, v


def _probe(name: str, left: torch.Tensor, right: torch.Tensor | None = None, scale: float = 1.0) -> list[float]:
    """u^T (scale * left @ right) v, or u^T left v when ``right`` is None."""
    left = left.detach().double().cpu()
    rows = left.shape[0]
    cols = right.shape[1] if right is not None else left.shape[1]
    u, v = _vectors(name, rows, cols)
    if right is None:
        values = ((u @ left) * v).sum(1)
    else:
        values = ((u @ left) * (right.detach().double().cpu() @ v.T).T).sum(1) * scale
    return [float(f"{x:.6g}") for x in values]


def _lora_layers(unet: nn.Module):
    """(name, module, active adapter names) of every peft LoRA layer."""
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            active = [] if getattr(module, "disable_adapters", False) else \
                [a for a in getattr(module, "active_adapters", []) if a in module.lora_A]
            yield name, module, active


def lora_probe(unet: nn.Module) -> dict[str, list[float]]:
    """Probes of the active LoRA's effective updates, scaling * B A, one entry per LoRA layer.

    Args:
        unet: The UNet with peft LoRA layers (layers without an active adapter are left out).

    Returns:
        Layer name -> ``PAIRS`` bilinear forms u^T (scaling B A) v, rounded to 6 significant digits;
        empty without a LoRA.

    Raises:
        ValueError: When a layer has more than one active adapter.
    """
    out = {}
    for name, module, active in _lora_layers(unet):
        if len(active) > 1:
            raise ValueError(f"{name}: {len(active)} LoRA adapters are active ({', '.join(active)}); "
                             "das-sd attributes one LoRA at a time")
        if active:
            a = active[0]
            # a conv LoRA's factors as matrices: B (out, r, 1, 1) -> (out, r), A (r, in, kh, kw) -> (r, in kh kw)
            out[name] = _probe(name, module.lora_B[a].weight.flatten(1), module.lora_A[a].weight.flatten(1),
                               float(module.scaling[a]))
    return out


def base_probe(unet: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, list[float]]:
    """Probes of the UNet's attention projections (the layers a LoRA wraps) and the text encoder's
    linears and embeddings.

    LoRA layers are left out, and wrapped layers are named as unwrapped, so the probes of a base
    model are the same with or without a LoRA loaded.

    Args:
        unet: The UNet.
        text_encoder: The text encoder; None leaves it out.

    Returns:
        "unet.<layer>" and "text_encoder.<layer>" -> ``PAIRS`` bilinear forms u^T W v, rounded to
        6 significant digits.
    """
    out = {}
    for name, module in unet.named_modules():
        clean = name.removesuffix(".base_layer")
        if isinstance(module, nn.Linear) and clean.endswith(("to_q", "to_k", "to_v", "to_out.0")) \
                and ".lora_" not in name:
            out[f"unet.{clean}"] = _probe(clean, module.weight)
    if text_encoder is not None:
        for name, module in text_encoder.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and ".lora_" not in name:
                # transformers releases differ on the "text_model." level; the weights are the same
                clean = name.removesuffix(".base_layer").removeprefix("text_model.")
                out[f"text_encoder.{clean}"] = _probe(clean, module.weight)
    return out


def pipeline_probes(pipe: StableDiffusionPipeline) -> dict[str, dict[str, list[float]]]:
    """The probes a feature store records for the pipeline it was built with.

    Args:
        pipe: The base pipeline with the LoRA loaded.

    Returns:
        {"base": ``base_probe`` of the UNet and text encoder, "lora": ``lora_probe`` of the UNet}.

    Raises:
        ValueError: When more than one LoRA adapter is active.
    """
    return {"base": base_probe(pipe.unet, getattr(pipe, "text_encoder", None)), "lora": lora_probe(pipe.unet)}


def probe_differences(expected: dict[str, list[float]], found: dict[str, list[float]]) -> list[str]:
    """Layers whose probes disagree (or that only one side has).

    Args:
        expected: Layer name -> probes, as recorded (e.g. in a store's manifest).
        found: Layer name -> probes of the pipeline at hand.

    Returns:
        One "<layer>: missing | unexpected | weights differ" line per disagreeing layer; empty when
        they agree within ``TOLERANCE`` (relative).
    """
    diffs = [f"{n}: missing" for n in sorted(set(expected) - set(found))]
    diffs += [f"{n}: unexpected" for n in sorted(set(found) - set(expected))]
    for name in sorted(set(expected) & set(found)):
        a, b = torch.tensor(expected[name]), torch.tensor(found[name])
        if (a - b).norm() > TOLERANCE * max(a.norm(), b.norm(), 1e-12):
            diffs.append(f"{name}: weights differ")
    return diffs
