"""Train / eval modes of a caller's modules, left as they were found.

Training switches a model to train mode and featurizing needs eval mode (no dropout, rows
independent). Both work on models a caller owns (a host's pipeline, a notebook's UNet): the switch
lasts for the call only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def restored_modes(*modules: nn.Module) -> Iterator[None]:
    """Every submodule's train/eval mode as it is now, put back when the block ends (on an error
    too). Submodules added inside the block (an adapter) keep the mode they were given.

    Args:
        modules: The root modules whose submodules' modes are saved.

    Yields:
        None, once: the block runs with the modules as they are.
    """
    saved = [(m, m.training) for root in modules for m in root.modules()]
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode inside the block, their own modes back after it.

    Args:
        modules: The modules to switch to eval mode (with all their submodules).

    Yields:
        None, once: the block runs with the modules in eval mode.
    """
    with restored_modes(*modules):
        for module in modules:
            module.eval()
        yield
