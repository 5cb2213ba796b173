"""Per-row gradients of an output function w.r.t. the LoRA parameters, from one batched backward.

A LoRA layer's A and B are linear maps, so the gradient of a row's scalar output w.r.t. a weight W
is sum over tokens of (d out / d y_token) (x_token)^T; for a convolution the "tokens" are the output
positions and x_token the input patch each one reads (``F.unfold`` of the input with the layer's
kernel, stride, padding and dilation). Forward hooks keep each LoRA linear's
input and the autograd edge of its output, and one backward of sum_rows f(row) to those edges yields
every row's gradient at once: rows never interact (eval mode, no dropout, GroupNorm is per sample), so
the gradient of the sum restricted to a row is that row's own gradient. The backward asks autograd for
the output gradients only, not for the LoRA weights' summed gradients a training step accumulates:
that work (as large as the per-row products made from the captures) is skipped. peft applies the LoRA scaling
after lora_B, so it is already inside the captured output gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import Conditioning, unet_kwargs
from ..noising import noisy_latents, training_target
from .lora_layers import lora_inventory
from .settings import output_function

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..projection import BlockProjector


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients and projections are accumulated in: float64 for a float64 model (exact
    comparisons, e.g. against a brute-force reference), float32 for float32 and half-precision ones.

    Args:
        dtype: The model's (or a gradient's) dtype.

    Returns:
        torch.float64 or torch.float32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoraGradientCapture:
    """Context manager: while active, the forward records each LoRA linear's input and the autograd
    edge of its output; ``backward(scalar)`` then fetches the gradients at those edges.

    See docs/method.md §6. Leaving the block removes the hooks and drops what was captured.

    Args:
        unet: The UNet with a LoRA loaded.

    Raises:
        ValueError: When the UNet has no LoRA layers.
    """

    def __init__(self, unet: nn.Module):
        self.modules = [(layer.name, layer.module) for layer in lora_inventory(unet).layers]
        self._inputs: dict[int, torch.Tensor] = {}
        self._edges: dict[int, object] = {}
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
        self._edges.clear()
        self._grads.clear()

    def _forward_hook(self, index: int):
        def hook(_module, inputs, output):
            self._inputs[index] = inputs[0].detach()
            if output.requires_grad:
                # an edge, not the tensor: holding every LoRA output alive would cost activation memory
                self._edges[index] = torch.autograd.graph.get_gradient_edge(output)
        return hook

    def backward(self, scalar: torch.Tensor, retain_graph: bool = False) -> None:
        """Gradients of ``scalar`` at every captured LoRA output (the weights' .grad stay untouched).

        Args:
            scalar: The summed output function of all rows, sum_rows f(row), from the captured forward.
            retain_graph: Keep the autograd graph for another backward (another output function).
        """
        indices = sorted(self._edges)
        grads = torch.autograd.grad(scalar, [self._edges[i] for i in indices], retain_graph=retain_graph,
                                    allow_unused=True)
        self._grads = {i: g.detach() for i, g in zip(indices, grads) if g is not None}

    def layer_gradients(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, (rows, p_layer)) per LoRA layer, in ``accumulation_dtype``, in parameter order: each row's gradient
        of one layer at a time, so that the whole (rows, p) matrix never has to exist.

        Yields:
            (offset, gradients): the layer's first coordinate in g, and its per-row gradients
            dF/dW flattened, (rows, p_layer).

        Raises:
            RuntimeError: When no gradient reached some LoRA layer in the last ``backward``.
        """
        offset = 0
        for i, (name, _) in enumerate(self.modules):
            if i not in self._grads:
                raise RuntimeError(f"no gradient reached LoRA layer {name}")
            dtype = accumulation_dtype(self._grads[i].dtype)
            layer = _weight_gradients(self.modules[i][1], self._inputs[i].to(dtype), self._grads[i].to(dtype))
            yield offset, layer
            offset += layer.shape[1]

    def per_row_gradients(self) -> torch.Tensor:
        """Each row's full LoRA gradient g, layers concatenated in parameter order.

        Returns:
            (rows, p) in ``accumulation_dtype``.
        """
        return torch.cat([layer for _, layer in self.layer_gradients()], dim=1)

    def projected_gradients(self, projector: BlockProjector,
                            group_bytes: int = 16 << 20) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, k) projected gradients and (rows,) squared gradient norms. Consecutive layers are
        projected together up to ``group_bytes`` of gradients at a time: one projection call per
        group instead of one per layer (a UNet has hundreds of small LoRA layers), while the whole
        (rows, p) matrix still never exists.

        Args:
            projector: The projection P, built for p = ``num_lora_parameters`` (docs/method.md §7).
            group_bytes: Most bytes of layer gradients per projection call (default 16 MiB).

        Returns:
            (P^T g per row, (rows, k); ||g||^2 per row, (rows,)), both in ``accumulation_dtype``
            on the projector's device.
        """
        out, sq_norm = None, None
        group: list[torch.Tensor] = []
        group_start, group_size = 0, 0

        def flush():
            nonlocal out
            if group:
                out = projector.project_range(torch.cat(group, dim=1) if len(group) > 1 else group[0],
                                              group_start, out)
                group.clear()

        for offset, layer in self.layer_gradients():
            part = layer.pow(2).sum(dim=1)
            sq_norm = part if sq_norm is None else sq_norm + part
            if group and group_size + layer.numel() * layer.element_size() > group_bytes:
                flush()
            if not group:
                group_start, group_size = offset, 0
            group.append(layer)
            group_size += layer.numel() * layer.element_size()
        flush()
        return out, sq_norm.to(out.device)


def _weight_gradients(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row dF/dW of a linear or convolution factor from its input and output gradient,
    flattened in the weight's own layout: (rows, out * in) or (rows, out * in * kh * kw)."""
    rows = x.shape[0]
    if isinstance(module, nn.Conv2d):
        # (rows, in * kh * kw, positions): channel-major, then kernel offsets, as the weight is laid out
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)
        return torch.bmm(g.flatten(2), patches.transpose(1, 2)).reshape(rows, -1)
    x = x.reshape(rows, -1, x.shape[-1])  # (rows, tokens, in)
    g = g.reshape(rows, -1, g.shape[-1])  # (rows, tokens, out)
    return torch.bmm(g.transpose(1, 2), x).reshape(rows, -1)


# the head name of projected_row_gradients whose f is <prediction, stopgrad(r)> / D per row (r = prediction -
# target, D its element count): its gradient is sum_t J_t^T r_t / D, the gradient of L_simple / 2 with the
# residual held as computed, the train side of the signed residual form (docs/method.md §9)
RESIDUAL_HEAD = "residual"


def head_output(name: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """f per row for a head of ``projected_row_gradients``: an output function, or ``RESIDUAL_HEAD``.

    Args:
        name: An output function of das_sd.registry.OUTPUT_FUNCTIONS, or ``RESIDUAL_HEAD``.
        prediction: The UNet's predictions, (rows, C, H, W).
        target: The rows' training target, same shape.

    Returns:
        f of each row, (rows,): for ``RESIDUAL_HEAD`` mean(prediction * stopgrad(prediction - target)),
        whose gradient is J^T r / D.

    Raises:
        ValueError: When ``name`` is neither.
    """
    if name == RESIDUAL_HEAD:
        return (prediction * (prediction - target).detach()).flatten(1).mean(dim=1)
    return output_function(name, prediction, target)


def residual_norms(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """r_t per row: the root mean square of prediction - target (docs/method.md §9).

    Args:
        prediction: The UNet's outputs, (rows, C, H, W).
        target: The training target of each row, same shape.

    Returns:
        (rows,) float32.
    """
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1).sqrt()


def forward_rows(unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  cond: torch.Tensor | Conditioning, alphas_cumprod: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """The UNet's prediction for every row (in ``accumulation_dtype``), with its autograd graph.

    Args:
        unet: The UNet with a LoRA loaded, in eval mode.
        x0: Clean latents, (rows, C, H, W).
        noise: The noise eps of each row, same shape.
        timesteps: t of each row, (rows,) integer.
        cond: Caption conditioning: (rows, tokens, dim) text states, or an SDXL ``Conditioning``.
        alphas_cumprod: abar of the training schedule, (T,).
        autocast_dtype: Run the UNet under autocast to this dtype; None for none.

    Returns:
        The prediction, (rows, C, H, W), still attached to the graph.
    """
    xt = noisy_latents(x0, noise, timesteps, alphas_cumprod)
    with torch.enable_grad():
        with torch.autocast(device_type=xt.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = unet(xt.to(unet.dtype), timesteps, **unet_kwargs(cond, unet.dtype)).sample
        return pred.to(accumulation_dtype(unet.dtype))


def per_row_gradients(unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      cond: torch.Tensor | Conditioning, alphas_cumprod: torch.Tensor, output: str,
                      autocast_dtype: torch.dtype | None = None, prediction_type: str = "epsilon") -> torch.Tensor:
    """Gradients of f(eps_theta(x_t, t, c)) w.r.t. the LoRA weights, one row per (x0, noise, t, c) row.

    Unprojected: the reference for tests (docs/method.md §6).

    Args:
        unet: The UNet with a LoRA loaded, in eval mode.
        x0: Clean latents, (rows, C, H, W).
        noise: The noise eps of each row, same shape.
        timesteps: t of each row, (rows,) integer.
        cond: Caption conditioning: (rows, tokens, dim) text states, or an SDXL ``Conditioning``.
        alphas_cumprod: abar of the training schedule, (T,).
        output: The output function f: "mean", "l1", "square" or "loss".
        autocast_dtype: Run the UNet under autocast to this dtype; None for none.
        prediction_type: The scheduler's prediction type (das_sd.noising.prediction_type), which
            fixes the target of f = "loss" (docs/method.md §2).

    Returns:
        (rows, p) in ``accumulation_dtype``.

    Raises:
        ModelError: When ``prediction_type`` is not one das-sd supports.
    """
    with LoraGradientCapture(unet) as capture:
        pred = forward_rows(unet, x0, noise, timesteps, cond, alphas_cumprod, autocast_dtype)
        target = training_target(prediction_type, x0.to(pred.dtype), noise.to(pred.dtype), timesteps, alphas_cumprod)
        capture.backward(output_function(output, pred, target).sum())
        return capture.per_row_gradients()


def projected_row_gradients(unet: nn.Module, heads: list[tuple[str, BlockProjector]], x0: torch.Tensor,
                            noise: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | Conditioning,
                            alphas_cumprod: torch.Tensor, autocast_dtype: torch.dtype | None = None,
                            prediction_type: str = "epsilon", row_errors: list[torch.Tensor] | None = None
                            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (output function f, projector) head: P^T g per row and ||g||^2 per row, without ever
    holding all rows' full gradients. The heads share one forward pass (a store's feature sets feed
    the UNet the same rows and differ only in f) and take one backward each.

    See docs/method.md §6-§7.

    Args:
        unet: The UNet with a LoRA loaded, in eval mode.
        heads: (output function name, projector) pairs, one per feature set; a name may also be
            ``RESIDUAL_HEAD`` (the per-row residual gradient J^T r / D, see ``head_output``).
        x0: Clean latents, (rows, C, H, W).
        noise: The noise eps of each row, same shape.
        timesteps: t of each row, (rows,) integer.
        cond: Caption conditioning: (rows, tokens, dim) text states, or an SDXL ``Conditioning``.
        alphas_cumprod: abar of the training schedule, (T,).
        autocast_dtype: Run the UNet under autocast to this dtype; None for none.
        prediction_type: The scheduler's prediction type (das_sd.noising.prediction_type), which
            fixes the target of f = "loss" (docs/method.md §2).
        row_errors: When a list, the rows' residual norms from this forward are appended to it:
            ||prediction - target||_rms per row, (rows,) float32 (docs/method.md §9).

    Returns:
        Per head, in order: (P^T g, (rows, k); ||g||^2, (rows,)), in ``accumulation_dtype``.

    Raises:
        ModelError: When ``prediction_type`` is not one das-sd supports.
    """
    with LoraGradientCapture(unet) as capture:
        pred = forward_rows(unet, x0, noise, timesteps, cond, alphas_cumprod, autocast_dtype)
        target = training_target(prediction_type, x0.to(pred.dtype), noise.to(pred.dtype), timesteps, alphas_cumprod)
        if row_errors is not None:
            row_errors.append(residual_norms(pred.detach(), target))
        results = []
        for j, (output, projector) in enumerate(heads):
            capture.backward(head_output(output, pred, target).sum(), retain_graph=j < len(heads) - 1)
            results.append(capture.projected_gradients(projector))
        return results
