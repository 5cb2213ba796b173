"""A feature store's indexes: the scorer arrays `das-sd index` writes (psi, leverage, ...), one file
per feature shard, under a generation that one manifest write switches every feature set to; the
files of a killed run are deleted by the next. Mixed into ``das_sd.store.FeatureStore``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save

from .io import file_sha256
from .store_integrity import StoreError, read_manifest
from .store_manifest import FORMAT_VERSION, MANIFEST


class StoreIndexes:
    """The index half of ``FeatureStore``: index generations written, recorded, checked and loaded.

    Attributes:
        root: The store directory (set by ``FeatureStore``).
        manifest: The parsed manifest; its ``indexes`` and ``checksums`` are updated in place.
    """

    root: Path
    manifest: dict
    _written: dict[str, dict]  # checksums of index files written, not yet recorded

    def keys_digest(self) -> str:
        """A digest of the store's keys in row order; an index records it to tell when rows were added.

        Returns:
            The sha256 hex digest of the keys joined by newlines.
        """
        return hashlib.sha256("\n".join(self.keys()).encode()).hexdigest()

    @property
    def store_id(self) -> str:
        """Short id of what the store holds (identity + rows): provenance written next to results."""
        h = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        h.update(self.keys_digest().encode())
        return "das-" + h.hexdigest()[:12]

    def new_generation(self) -> str:
        """A fresh name part for index files: a rebuild never overwrites the files in use.

        Returns:
            8 hex digits from the time, process id and store path.
        """
        return hashlib.sha256(f"{time.time_ns()}:{os.getpid()}:{self.root}".encode()).hexdigest()[:8]

    def write_index_files(self, name: str, shards: Iterable[dict[str, torch.Tensor]],
                          generation: str | None = None) -> list[str]:
        """Write an index as one file per feature shard (same rows), consuming ``shards`` lazily so
        that one shard is in memory at a time. The files are not in use until ``record_indexes``
        switches the manifest to them; pass one ``generation`` for all sets of an index run.

        Args:
            name: The feature set the index is for (``"das"``, ``"dtrak"``, ``"trak"``).
            shards: Per feature shard, in order, the named arrays of its rows (moved to the CPU).
            generation: The files' generation; None: a new one (``new_generation``).

        Returns:
            The written files' names, for ``record_indexes``.
        """
        generation = generation or self.new_generation()
        files = []
        for i, arrays in enumerate(shards):
            file = f"index-{name}-{generation}-{i:05d}.safetensors"
            self._written[file] = self._write(file, save({k: v.detach().cpu().contiguous() for k, v in arrays.items()}))
            files.append(file)
        return files

    def record_indexes(self, built: dict[str, tuple[list[str], dict]]) -> None:
        """Switch every set of ``built`` ({set: (files, info)}) to its new files in one manifest write,
        then delete the files they replace: a kill at any point leaves one consistent generation.

        Args:
            built: Per feature set, the files ``write_index_files`` returned and the index's info
                (lambda, rule, dtype, ...); the rows and keys digest are added to the info.
        """
        old = {f for name in built for f in self.index_files(name)}
        indexes, checksums = self.manifest.setdefault("indexes", {}), self.manifest.setdefault("checksums", {})
        new = set()
        for name, (files, info) in built.items():
            indexes[name] = info | {"files": files, "rows": len(self), "keys_digest": self.keys_digest()}
            for file in files:
                checksums[file] = self._written.pop(file, None) or {
                    "sha256": file_sha256(self.root / file), "bytes": (self.root / file).stat().st_size}
            new.update(files)
        for file in old - new:
            checksums.pop(file, None)
        self._save_manifest()
        for file in old - new:
            (self.root / file).unlink(missing_ok=True)

    def record_index(self, name: str, files: list[str], info: dict) -> None:
        """``record_indexes`` for one feature set.

        Args:
            name: The feature set.
            files: Its new index files, from ``write_index_files``.
            info: The index's info.
        """
        self.record_indexes({name: (files, info)})

    def remove_orphan_indexes(self) -> list[str]:
        """Delete index files no manifest entry names (written by an index run killed before its
        switch); returns their names. Not while another process is indexing this store.

        Returns:
            The deleted files' names, sorted.
        """
        used = {f for name in self.manifest.get("indexes", {}) for f in self.index_files(name)}
        on_disk = type(self)(self.root, read_manifest(self.root / MANIFEST, FORMAT_VERSION))
        used |= {f for name in on_disk.manifest["indexes"] for f in on_disk.index_files(name)}  # a newer writer's
        orphans = sorted(p.name for p in self.root.glob("index-*.safetensors") if p.name not in used)
        for file in orphans:
            (self.root / file).unlink(missing_ok=True)
        return orphans

    def index_files(self, name: str) -> list[str]:
        """The index files the manifest lists for a feature set (current or not), in row order.

        Args:
            name: The feature set.

        Returns:
            The file names; empty when it has no index.
        """
        info = self.index_info(name) or {}
        return info.get("files") or ([info["file"]] if "file" in info else [])

    def index_info(self, name: str) -> dict | None:
        """The manifest's record of a feature set's index: lambda, dtype, files, rows, keys digest, ...

        Args:
            name: The feature set.

        Returns:
            The record, or None when the set has no index.
        """
        return self.manifest.get("indexes", {}).get(name)

    def index_is_current(self, name: str) -> bool:
        """Whether a feature set's index covers exactly the store's rows (none added since).

        Args:
            name: The feature set.

        Returns:
            False too when the set has no index.
        """
        info = self.index_info(name)
        return bool(info and info.get("keys_digest") == self.keys_digest())

    def _current_index(self, name: str) -> list[Path]:
        if self.index_info(name) is None:
            raise StoreError(f"{self.root}: no index for {name!r}; run `das-sd index --store {self.root}`")
        if not self.index_is_current(name):
            raise StoreError(f"{self.root}: the {name!r} index is out of date (rows were added since); "
                             f"run `das-sd index --store {self.root}` again")
        return [self._checked(f, "index file") for f in self.index_files(name)]

    def iter_index(self, name: str) -> Iterator[Path]:
        """The index files of ``name`` in row order (for streaming over them).

        Args:
            name: The feature set.

        Yields:
            Each file's path, all checked before the first is yielded.

        Raises:
            StoreError: The index is absent or out of date, or a file is missing or damaged.
        """
        yield from self._current_index(name)

    def load_index(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Every array of a feature set's index for all rows (``docs/method.md §10``).

        Args:
            name: The feature set.
            device: Where the arrays are loaded.

        Returns:
            Array name -> (N, ...) tensor, e.g. ``"psi_das"`` (N, k), ``"leverage"`` (N,).

        Raises:
            StoreError: The index is absent or out of date, or a file is missing or damaged.
        """
        parts: dict[str, list[torch.Tensor]] = {}
        for path in self._current_index(name):
            try:
                with safe_open(str(path), framework="pt", device=device) as fh:
                    for k in fh.keys():
                        parts.setdefault(k, []).append(fh.get_tensor(k))
            except Exception as exc:
                raise StoreError(f"{path}: damaged index ({exc})") from exc
        return {k: torch.cat(v) for k, v in parts.items()}
