"""What a feature store's manifest says about its rows and what they were computed with: the file
name and format version, one ``Row`` per training sample, and the identity a store is opened
against (a field added after stores were first written takes its ``IDENTITY_DEFAULTS`` value).

The store itself (das_sd.store) reads and writes the manifest; this module holds the plain values
other modules need without opening one (featurize plans, model families).
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = 1  # checksums were added without a bump: stores without them open, unverified
MANIFEST = "manifest.json"
# identity fields added after stores were first written, with the value every store without them
# was built with: such a store still matches (and resumes) where the field has that value
IDENTITY_DEFAULTS = {"prediction_type": "epsilon", "buckets": None, "model_family": "sd"}


@dataclass(frozen=True)
class Row:
    """One training sample as the store lists it.

    Attributes:
        key: The sample's key, unique in the store (``data.datasets.sample_key``, ``docs/method.md §4``).
        path: The image's path relative to the dataset root.
        caption: The sample's caption.
    """

    key: str
    path: str
    caption: str


def identity_with_defaults(identity: dict) -> dict:
    """An identity with the fields a store written before them lacks filled in (``IDENTITY_DEFAULTS``).

    Args:
        identity: A store identity, from a manifest or computed by a caller.

    Returns:
        A new dict: ``IDENTITY_DEFAULTS`` updated with ``identity``.
    """
    return {**IDENTITY_DEFAULTS, **identity}


def blocks_of(rows: list[Row], shard_size: int) -> list[list[Row]]:
    """``rows`` cut into shard-sized blocks, in order.

    Args:
        rows: The rows to cut.
        shard_size: Rows per block (>= 1); the last block may be shorter.

    Returns:
        The blocks; empty for no rows.
    """
    return [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]
