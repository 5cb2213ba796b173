"""Per-row gradients of an output function w.r.t. the LoRA parameters, from one batched backward.

A LoRA layer's A and B are plain linear maps, so the gradient of a row's scalar output w.r.t. a
weight W is sum over tokens of (d out / d y_token) (x_token)^T. Forward hooks keep each LoRA linear's
input, tensor hooks keep the gradient of its output, and one backward of sum_rows f(row) yields every
row's gradient at once: rows never interact (eval mode, no dropout, GroupNorm is per sample), so the
gradient of the sum restricted to a row is that row's own gradient. peft applies the LoRA scaling
after lora_B, so it is already inside the captured output gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from .settings import output_function


def lora_modules(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The LoRA A / B linear layers of the active adapters, in parameter order."""
    found = [(name, m) for name, m in unet.named_modules()
             if isinstance(m, nn.Linear) and (".lora_A." in name or ".lora_B." in name)]
    if not found:
        raise ValueError("the UNet has no LoRA layers: load a LoRA before featurizing")
    return found


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [m.weight for _, m in lora_modules(unet)]


def num_lora_parameters(unet: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(unet))


class LoraGradientCapture:
    """Context manager: while active, a backward pass records per-row LoRA weight gradients."""

    def __init__(self, unet: nn.Module):
        self.modules = lora_modules(unet)
        self._inputs: dict[int, torch.Tensor] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "LoraGradientCapture":
        for i, (_, module) in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._forward_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._grads.clear()

    def _forward_hook(self, index: int):
        def hook(_module, inputs, output):
            self._inputs[index] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: self._grads.__setitem__(index, grad.detach()))
        return hook

    def per_row_gradients(self) -> torch.Tensor:
        """(rows, p) float32: each row's gradient, layers concatenated in parameter order."""
        parts = []
        for i, (name, _) in enumerate(self.modules):
            if i not in self._grads:
                raise RuntimeError(f"no gradient reached LoRA layer {name}")
            x, g = self._inputs[i].float(), self._grads[i].float()
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, in)
            g = g.reshape(g.shape[0], -1, g.shape[-1])  # (rows, tokens, out)
            parts.append(torch.einsum("bto,bti->boi", g, x).reshape(x.shape[0], -1))
        return torch.cat(parts, dim=1)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, row by row."""
    a = alphas_cumprod.to(x0.device)[timesteps].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def per_row_gradients(unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      cond: torch.Tensor, alphas_cumprod: torch.Tensor, output: str,
                      autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gradients of f(eps_theta(x_t, t, c)) w.r.t. the LoRA weights, one row per (x0, noise, t, c) row."""
    xt = noisy_latents(x0, noise, timesteps, alphas_cumprod)
    with LoraGradientCapture(unet) as capture:
        with torch.enable_grad():
            with torch.autocast(device_type=xt.device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                pred = unet(xt.to(unet.dtype), timesteps, encoder_hidden_states=cond.to(unet.dtype)).sample
            values = output_function(output, pred.float(), noise.float())
            values.sum().backward()
        grads = capture.per_row_gradients()
    for p in lora_parameters(unet):  # the batched backward also filled .grad: drop it
        p.grad = None
    return grads
