"""Writing a feature store: shards appended or adopted from a partial store, each file written
atomically with its sha256 recorded, and the manifest saved after the file it lists (a job killed at
any point leaves a consistent store). Mixed into ``das_sd.store.FeatureStore``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save

from .io import atomic_write_bytes, atomic_write_json
from .store_integrity import StoreError, check_file, remember_verified
from .store_manifest import MANIFEST, Row


class StoreWriter:
    """The writing half of ``FeatureStore``: its shards and the manifest entries that list them.

    Attributes:
        root: The store directory (set by ``FeatureStore``).
        manifest: The parsed manifest, updated in place and saved after each file.
    """

    root: Path
    manifest: dict

    def shard_name(self, index: int) -> str:
        """The file name of feature shard number ``index``.

        Args:
            index: The shard's position, from 0.

        Returns:
            ``"features-NNNNN.safetensors"``.
        """
        return f"features-{index:05d}.safetensors"

    def append_shard(self, rows: list[Row], arrays: dict[str, torch.Tensor], extra: dict | None = None) -> None:
        """Write one shard (atomically), then record it in the manifest (atomically). The store is
        marked incomplete until ``mark_complete``.

        Args:
            rows: The shard's rows, in order.
            arrays: Named arrays, each with ``len(rows)`` rows first (e.g. ``"features.das"`` (n, k)
                float32); moved to the CPU to be saved.
            extra: More fields for the shard's manifest entry (e.g. ``{"block": n}`` of a parallel
                part); None: none.

        Raises:
            StoreError: An array's row count differs from ``len(rows)``.
        """
        for name, value in arrays.items():
            if value.shape[0] != len(rows):
                raise StoreError(f"array {name!r} has {value.shape[0]} rows for {len(rows)} keys")
        index = len(self.manifest["shards"])
        name = self.shard_name(index)
        tensors = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}
        self.manifest["checksums"][name] = self._write(name, save(tensors))
        self.manifest["shards"].append({
            "file": name,
            "rows": len(rows),
            "arrays": {k: [str(v.dtype).removeprefix("torch."), list(v.shape[1:])] for k, v in tensors.items()},
            "keys": [r.key for r in rows],
            "paths": [r.path for r in rows],
            "captions": [r.caption for r in rows],
        } | (extra or {}))
        self.manifest["complete"] = False
        self._save_manifest()

    def adopt_shard(self, source: Path, entry: dict, checksum: dict | None = None) -> None:
        """Move a shard written by another store (a partial store of the same identity) in as the
        next shard. Rename first, manifest second: rerun after a kill, it finds the file in place.
        ``checksum``: the one the other store recorded, checked here and carried over.

        Args:
            source: The shard file in the other store; moved (renamed) into this one.
            entry: Its manifest entry in the other store (rows, arrays, keys, ...); ``block`` and
                ``file`` are not carried over.
            checksum: Its recorded ``{"sha256", "bytes"}``; None: not checked, none recorded.

        Raises:
            StoreError: Neither ``source`` nor an already moved file is there, or the file does not
                match ``checksum``.
        """
        name = self.shard_name(len(self.manifest["shards"]))
        target = self.root / name
        if Path(source).is_file():
            check_file(Path(source), checksum, Path(source).parent)
            os.replace(source, target)
        elif target.is_file():
            check_file(target, checksum, self.root)
        else:
            raise StoreError(f"{source}: shard listed in its manifest is missing")
        if checksum is not None:
            self.manifest["checksums"][name] = checksum
        self.manifest["shards"].append({k: v for k, v in entry.items() if k != "block"} | {"file": name})
        self.manifest["complete"] = False
        self._save_manifest()

    def mark_complete(self, complete: bool = True) -> None:
        """Record in the manifest whether every row of the dataset has been featurized.

        Args:
            complete: The flag to record.
        """
        self.manifest["complete"] = complete
        self._save_manifest()

    def _save_manifest(self) -> None:
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def _write(self, name: str, data: bytes) -> dict:
        """Write one file atomically; its checksum, hashed from the bytes in memory."""
        checksum = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        atomic_write_bytes(self.root / name, data)
        remember_verified(self.root / name, checksum["sha256"])
        return checksum
