"""Dataset-level inspection: influence rolled up over many generations, per image and per group."""

from .inspection import (MAX_MAPPING_BYTES, Generation, InspectSettings, Inspection, generate_queries, image_queries,
                         inspect_generations, read_group_mapping, read_mapping_inside, training_groups)
from .rollup import credit_shares, group_credits, image_credits, signed_shares
from .signals import image_signals

__all__ = ["MAX_MAPPING_BYTES", "Generation", "InspectSettings", "Inspection", "credit_shares", "generate_queries", "group_credits",
           "image_credits", "image_queries", "image_signals", "inspect_generations", "read_group_mapping",
           "read_mapping_inside",            "signed_shares", "training_groups"]
