"""Dataset-level inspection: influence rolled up over many generations, per image and per group."""

from .generations import generate_queries, image_queries
from .groups import MAX_MAPPING_BYTES, read_group_mapping, read_mapping_inside, training_groups
from .inspection import Generation, InspectSettings, Inspection, inspect_generations
from .rollup import credit_shares, group_credits, image_credits, signed_shares
from .signals import image_signals

__all__ = ["MAX_MAPPING_BYTES", "Generation", "InspectSettings", "Inspection", "credit_shares", "generate_queries", "group_credits",
           "image_credits", "image_queries", "image_signals", "inspect_generations", "read_group_mapping",
           "read_mapping_inside",            "signed_shares", "training_groups"]
