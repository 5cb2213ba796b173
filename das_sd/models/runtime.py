"""Where and how quietly models run: the default device, and the libraries' own chatter turned off."""

from __future__ import annotations

import torch


def quiet_libraries() -> None:
    """Silence the libraries' own loading bars and benign warnings; das-sd shows its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def default_device() -> torch.device:
    """The device das-sd runs on when none is given.

    Returns:
        CUDA when available, else the CPU.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
