"""The feature store: a folder of safetensors shards plus a JSON manifest.

```
STORE/
  manifest.json                 identity (what the features were computed with), rows per shard, state
  features-00000.safetensors    fixed-size row blocks: one tensor per named array ("features.das", ...)
  features-00001.safetensors
  index-das-<gen>-00000.safetensors  scorer arrays written by `das-sd index` (psi, leverage, ...),
  index-das-<gen>-00001.safetensors  one file per feature shard, same rows
```

- The manifest's ``identity`` (base model, LoRA, featurizer settings, ...) is compared on open: a
  store built with anything else is refused with a message naming each difference.
- Shards and the manifest are written to a temp file and renamed, shard first: a job killed at any
  point leaves a consistent store, and a rerun recomputes only what the manifest does not list.
- Rows are only ever appended: adding samples to a dataset extends the store without touching the
  existing shards (the scorer's index is then out of date and says so).
- Every file's sha256 is recorded in the manifest (``checksums``) and checked before a process first
  reads the file; the manifest's fields are type-checked on open (``das_sd.store_integrity``).
- An index run writes the files of all its feature sets under one generation, then switches every
  set to it in one manifest write: a kill leaves the previous generation in force for all of them,
  and the next index run deletes the files no manifest entry names.
This module knows nothing of models: rows are (key, path, caption) plus named arrays.

Here: creating and opening a store, its identity and its rows. The manifest's plain values are
das_sd.store_manifest's; writing shards is das_sd.store_write, reading them das_sd.store_read, and
the index files das_sd.store_index (the three parts ``FeatureStore`` is made of).
"""

from __future__ import annotations

import time
from pathlib import Path

from .store_index import StoreIndexes
from .store_integrity import StoreError, read_manifest
from .store_manifest import FORMAT_VERSION, MANIFEST, Row, blocks_of, identity_with_defaults
from .store_read import StoreReader
from .store_write import StoreWriter

__all__ = ["FeatureStore", "Row", "StoreError"]


def _diff(expected, found, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for k in sorted(set(expected) | set(found)):
            out += _diff(expected.get(k), found.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if expected != found:
        return [f"{prefix}: store has {found!r}, requested {expected!r}"]
    return []


class FeatureStore(StoreWriter, StoreReader, StoreIndexes):
    """A folder of safetensors feature shards with its ``manifest.json``: the identity it was built
    for (model, LoRA, dataset, featurizer settings), the shards and index files with their sha256,
    and the current index generation.

    Open one with ``FeatureStore.open(path)`` (raises StoreError naming the file and field when it
    is missing, damaged or of another format version); ``FeatureStore.create`` starts a new one.
    Files are checked against their checksums on first read in a process.

    Args:
        root: The store directory, resolved.
        manifest: The parsed, checked manifest (``read_manifest``); the store updates it in place.
    """

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self._written: dict[str, dict] = {}  # checksums of index files written, not yet recorded

    # ---- create / open -----------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, identity: dict, shard_size: int = 256, info: dict | None = None,
               moved_shards: bool = False) -> "FeatureStore":
        """A new, empty store. Refused in a folder holding store files but no manifest, except
        ``moved_shards``: shards a killed merge moved in (each is checked when it is adopted).

        Args:
            root: The store directory (``~`` expanded); created with its parents if absent.
            identity: What the features are computed with (model and LoRA fingerprints, featurizer
                settings, ...); later opens must match it exactly.
            shard_size: Rows per feature shard.
            info: Provenance that is not part of the identity (paths of the base, LoRA, dataset).
            moved_shards: Allow ``features-*`` files already in the folder (not ``index-*`` ones).

        Returns:
            The new store, with its manifest written.

        Raises:
            StoreError: ``root`` already has a manifest, or holds store files but no manifest.
        """
        root = Path(root).expanduser().resolve()
        if (root / MANIFEST).exists():
            raise StoreError(f"{root}: a store already exists here")
        stray = sorted(p.name for p in root.glob("*.safetensors")
                       if p.name.startswith("index-") or (p.name.startswith("features-") and not moved_shards))
        if stray:  # a store whose manifest was lost: a new one beside its files would mix them up
            raise StoreError(f"{root}: holds feature store files ({', '.join(stray[:3])}"
                             f"{', ...' if len(stray) > 3 else ''}; {len(stray)} in all) but no {MANIFEST}, "
                             "so they cannot be used or extended. Choose another --store folder, or delete "
                             "those files to start a new store here.")
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "identity": identity,
            "info": info or {},
            "shard_size": int(shard_size),
            "shards": [],
            "complete": False,
            "indexes": {},
            "checksums": {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        store = cls(root, manifest)
        store._save_manifest()
        return store

    @classmethod
    def open(cls, root: str | Path, identity: dict | None = None, clean: bool = True) -> "FeatureStore":
        """Open an existing store; with ``identity``, refuse it unless it matches exactly.
        ``clean``: remove temp files of killed writes (False to only read, as `das-sd verify`).

        Args:
            root: The store directory (``~`` expanded).
            identity: The identity the caller computes with; None: accept any.
            clean: Delete leftover ``.*.tmp`` files in ``root``.

        Returns:
            The store.

        Raises:
            StoreError: ``root`` has no manifest, the manifest is damaged or of another format
                version, or it was built for another ``identity`` (each difference named).
        """
        root = Path(root).expanduser().resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise StoreError(f"{root}: no feature store here (no {MANIFEST})")
        store = cls(root, read_manifest(path, FORMAT_VERSION))
        if identity is not None:
            store.check_identity(identity)
        if clean:
            for tmp in root.glob(".*.tmp"):  # leftovers of a killed write
                tmp.unlink(missing_ok=True)
        return store

    @classmethod
    def open_or_create(cls, root: str | Path, identity: dict, shard_size: int = 256,
                       info: dict | None = None, moved_shards: bool = False) -> "FeatureStore":
        """The store at ``root`` if it has a manifest (``open`` with ``identity``), else a new one
        (``create``): how a featurize run starts and resumes.

        Args:
            root: The store directory (``~`` expanded).
            identity: What the features are computed with; an existing store must match it.
            shard_size: Rows per shard of a new store (an existing one keeps its own).
            info: Provenance; merged into an existing store's ``info`` in memory (written with the
                next manifest write).
            moved_shards: As ``create``'s, for a new store.

        Returns:
            The opened or created store.

        Raises:
            StoreError: As ``open`` or ``create`` raise it.
        """
        root = Path(root).expanduser().resolve()
        if (root / MANIFEST).exists():
            store = cls.open(root, identity)
            if info:
                store.manifest["info"].update(info)
            return store
        return cls.create(root, identity, shard_size, info, moved_shards)

    def check_identity(self, identity: dict) -> None:
        """Refuse the store unless its identity equals ``identity`` exactly, a field absent on
        either side taking its ``IDENTITY_DEFAULTS`` value.

        Args:
            identity: The identity the caller computes with.

        Raises:
            StoreError: The identities differ; the message lists each differing field.
        """
        differences = _diff(identity_with_defaults(identity), identity_with_defaults(self.manifest["identity"]))
        if differences:
            raise StoreError(f"{self.root}: this store was built for something else:\n  "
                             + "\n  ".join(differences)
                             + "\nUse another --store folder, or the settings the store was built with.")

    # ---- rows ----------------------------------------------------------------------------------

    @property
    def identity(self) -> dict:
        """What the store's features were computed with (the manifest's ``identity``)."""
        return self.manifest["identity"]

    @property
    def shard_size(self) -> int:
        """Rows per feature shard (the last shard of a run may hold fewer)."""
        return int(self.manifest["shard_size"])

    def rows(self) -> list[Row]:
        """Every row of the store, in row order.

        Returns:
            One ``Row`` per stored sample.
        """
        return [Row(k, p, c) for s in self.manifest["shards"] for k, p, c in zip(s["keys"], s["paths"], s["captions"])]

    def keys(self) -> list[str]:
        """The sample keys of every row, in row order.

        Returns:
            The keys.
        """
        return [k for s in self.manifest["shards"] for k in s["keys"]]

    def __len__(self) -> int:
        return sum(len(s["keys"]) for s in self.manifest["shards"])

    def missing(self, rows: list[Row]) -> list[Row]:
        """The rows (in the given order) whose keys the store does not hold yet.

        Args:
            rows: The dataset's rows.

        Returns:
            Those of ``rows`` still to featurize.
        """
        have = set(self.keys())
        return [r for r in rows if r.key not in have]

    def plan(self, rows: list[Row]) -> list[list[Row]]:
        """Missing rows cut into shard-sized blocks, in order: the work left to do.

        Args:
            rows: The dataset's rows.

        Returns:
            Blocks of at most ``shard_size`` missing rows, one per shard to write.
        """
        return blocks_of(self.missing(rows), self.shard_size)
