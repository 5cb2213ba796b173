"""Seeded random generators: every random draw of das-sd comes from an explicit generator, never
from torch's global one (a caller's global RNG state is theirs)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def text_seed(text: str, drop_low_bit: bool = False) -> int:
    """A 63-bit seed from ``text``: the first 8 bytes of its sha256, little-endian, with the top bit
    dropped, or with ``drop_low_bit`` the lowest (shifted right), as LDS noise and the fingerprint
    probes have always drawn theirs: either way changes the seeds, and results depend on them.

    Args:
        text: Any text; its UTF-8 bytes are hashed.
        drop_low_bit: False (default): clear the top bit; True: shift right by one instead.

    Returns:
        A seed in ``[0, 2**63)``.
    """
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return value >> 1 if drop_low_bit else value & ((1 << 63) - 1)


def generator(seed: int | str, drop_low_bit: bool = False) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with ``text_seed(seed, drop_low_bit)`` for a text
    (values drawn on the CPU are the same on every machine; callers move them to a device).

    Args:
        seed: An integer seed, used as is, or a text hashed by ``text_seed``.
        drop_low_bit: Passed to ``text_seed`` for a text seed; ignored for an integer.

    Returns:
        A new seeded ``torch.Generator`` on the CPU.
    """
    return torch.Generator().manual_seed(text_seed(seed, drop_low_bit) if isinstance(seed, str) else seed)


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """torch's global generators seeded with ``seed`` inside the block (code that draws from them,
    as peft's LoRA initialisation does, gets the same numbers as after ``torch.manual_seed(seed)``),
    and the caller's states back after it. CUDA generators are forked and seeded only once CUDA
    is initialised: seeding it before would queue a seed that lands at its later initialisation.

    Args:
        seed: The seed for torch's CPU generator (and every CUDA device's, once CUDA is initialised).

    Yields:
        None, once; the caller's generator states are restored when the block exits.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield
