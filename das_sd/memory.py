"""Memory budgets: how many (sample, timestep) rows go through one forward and backward, and how
many images through one VAE call.

At SD 1.5's width a row at 512 px keeps about 2.5 GB of activations for its backward, so a batch of
16 samples x K = 20 timesteps would need hundreds of GB. The featurizer therefore cuts the rows of
a batch into passes that fit a budget (``--max-memory``; default: what the device has free). Rows
never interact (eval mode, GroupNorm per sample), so the cut changes nothing but how rows share a
kernel call (docs/method.md §6).

The bytes one row needs are *measured*, not guessed: one row goes through the model with autograd's
saved-tensor hooks counting every tensor kept for the backward (each storage once). That is device
independent and exact for what the backward holds; ``HEADROOM`` covers the transient buffers of a
pass (the output gradients captured for the LoRA layers, workspace of the kernels).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch

#: multiple of the measured saved bytes a row is budgeted (captured LoRA gradients, kernel workspace)
HEADROOM = 1.5
#: share of the free memory used when no budget is given (the rest: weights' copies, the OS, other work)
DEFAULT_SHARE = 0.8

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_memory_size(text: str) -> int:
    """A memory size as users write it: ``24GB``, ``512MiB``, ``1.5g`` or plain bytes (binary units).

    Args:
        text: The size; units k, m, g, t with optional b / ib, any case.

    Returns:
        The size in bytes.

    Raises:
        ValueError: When the text is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a memory size (e.g. 24GB, 512MiB, 1.5g)")
    return int(float(match.group(1)) * _UNITS[unit])


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give: CUDA's free memory, or the host's available memory.

    Args:
        device: The device the model runs on.

    Returns:
        Free bytes (for the CPU: /proc/meminfo's MemAvailable, else physical memory).
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(device: torch.device, max_memory: int | None = None) -> int:
    """The bytes a featurizing pass may take.

    Args:
        device: The model's device.
        max_memory: The user's budget (``--max-memory``), or None for ``DEFAULT_SHARE`` of the free memory.

    Returns:
        The budget in bytes.
    """
    return int(max_memory) if max_memory is not None else int(DEFAULT_SHARE * free_memory(device))


def saved_bytes(run: Callable[[], object]) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``run()`` builds its graph.

    Args:
        run: Builds the forward graph of one row (called once, under grad mode); its result is dropped.

    Returns:
        The summed size of the distinct storages saved for backward.
    """
    seen: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def rows_per_pass(budget: int, bytes_per_row: int, rows: int) -> int:
    """How many rows one pass takes: as many as the budget holds, at least one, at most ``rows``.

    Args:
        budget: Bytes a pass may take.
        bytes_per_row: Measured saved bytes of one row (``saved_bytes``); ``HEADROOM`` is applied here.
        rows: The rows there are.

    Returns:
        Rows per pass, in [1, rows].
    """
    fit = int(budget // max(1.0, HEADROOM * bytes_per_row))
    return max(1, min(rows, fit))
