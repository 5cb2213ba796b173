"""The error das-sd raises for a base model or LoRA it cannot use."""

from __future__ import annotations


class ModelError(ValueError):
    """A model or LoRA that cannot be used; the message names the path."""
