"""Dataset-level inspection: influence rolled up over many generations, per image and per group."""

from .inspection import (Generation, InspectSettings, Inspection, generate_queries, image_queries,
                         inspect_generations, read_group_mapping, training_groups)
from .rollup import credit_shares, group_credits, image_credits, signed_shares
from .signals import image_signals

__all__ = ["Generation", "InspectSettings", "Inspection", "credit_shares", "generate_queries", "group_credits",
           "image_credits", "image_queries", "image_signals", "inspect_generations", "read_group_mapping",
           "signed_shares", "training_groups"]
