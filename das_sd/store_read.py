"""Reading a feature store: its shards' named arrays, whole or in chunks, and the files of its
indexes, each file checked against the checksum the manifest records before a process first reads
it (das_sd.store_integrity). Mixed into ``das_sd.store.FeatureStore``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .store_chunks import ArrayChunks, array_chunks
from .store_integrity import StoreError, check_file


class StoreReader:
    """The reading half of ``FeatureStore``: shard and index files checked, arrays loaded.

    Attributes:
        root: The store directory (set by ``FeatureStore``).
        manifest: The parsed manifest.
    """

    root: Path
    manifest: dict

    def checksum(self, file: str) -> dict | None:
        """{"sha256", "bytes"} recorded for a file of the store; None for one an older das-sd wrote.

        Args:
            file: A file name inside the store, as the manifest lists it.

        Returns:
            The recorded checksum, or None when none is recorded.
        """
        return self.manifest.get("checksums", {}).get(file)

    def _checked(self, file: str, what: str) -> Path:
        """The path of a file the manifest lists, after checking it is there and undamaged."""
        path = self.root / file
        if not path.is_file():
            raise StoreError(f"{path}: {what} listed in the manifest is missing; "
                             f"run `das-sd verify --store {self.root}`")
        check_file(path, self.checksum(file), self.root)
        return path

    def array_names(self) -> list[str]:
        """The named arrays each feature shard holds (those of the first shard).

        Returns:
            The names, sorted; empty for a store without rows.
        """
        shards = self.manifest["shards"]
        return sorted(shards[0]["arrays"]) if shards else []

    def shard_paths(self) -> list[Path]:
        """The feature shards in row order, each checked against its checksum.

        Returns:
            The shards' paths.

        Raises:
            StoreError: A shard is missing or does not match its checksum.
        """
        return [self._checked(s["file"], "shard") for s in self.manifest["shards"]]

    def array_files(self, index: str | None = None) -> list[Path]:
        """The files of the feature shards (``index`` None) or of index set ``index``, in row order,
        each checked against its checksum.

        Args:
            index: A feature set whose index files to list (``"das"``, ...); None: the feature shards.

        Returns:
            The files' paths.

        Raises:
            StoreError: The index is absent or out of date, or a file is missing or damaged.
        """
        return self.shard_paths() if index is None else self._current_index(index)

    def array_chunks(self, name: str, index: str | None = None, chunk_rows: int | None = None,
                     chunk_bytes: int = 8 << 20) -> Iterator[ArrayChunks]:
        """Array ``name`` of each file (as ``array_files``) in row order, to be read in chunks of
        ``chunk_rows`` rows (default: ``chunk_bytes`` of the file): a whole-store scan holding two
        chunks in memory (das_sd.store_chunks). Every file is checked before the first is read.

        Args:
            name: The array, e.g. ``"features.das"`` in the shards or ``"psi_das"`` in an index.
            index: The feature set whose index files hold it; None: the feature shards.
            chunk_rows: Rows per chunk; None: derived from ``chunk_bytes``.
            chunk_bytes: Bytes per chunk when ``chunk_rows`` is None (default 8 MiB).

        Returns:
            An iterator of one ``ArrayChunks`` per file, in row order.

        Raises:
            StoreError: As ``array_files``; a file without the array raises when it is reached.
        """
        return array_chunks(self.array_files(index), name, chunk_rows, chunk_bytes)

    def iter_shards(self, names: list[str], device: str = "cpu") -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
        """(shard entry, {name: tensor}) per shard, memory-mapped by safetensors.

        Args:
            names: The arrays to read from each shard.
            device: Where the tensors are loaded (``"cpu"``, ``"cuda"``, ...).

        Yields:
            Each shard's manifest entry and its arrays, in row order.

        Raises:
            StoreError: A shard is missing, damaged, or lacks one of ``names``.
        """
        for shard in self.manifest["shards"]:
            path = self._checked(shard["file"], "shard")
            try:
                with safe_open(str(path), framework="pt", device=device) as fh:
                    available = set(fh.keys())
                    absent = [n for n in names if n not in available]
                    if absent:
                        raise StoreError(f"{path}: no array(s) {absent}; the store has {sorted(available)}")
                    yield shard, {n: fh.get_tensor(n) for n in names}
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"{path}: damaged shard ({exc})") from exc

    def load(self, name: str, device: str = "cpu") -> torch.Tensor:
        """One named array for all rows, concatenated in row order.

        Args:
            name: The array, e.g. ``"features.das"`` ((N, k) float32) or ``"latents"``.
            device: Where the result is loaded.

        Returns:
            The (N, ...) array.

        Raises:
            StoreError: The store holds no rows, or a shard is missing, damaged or lacks the array.
        """
        parts = [arrays[name] for _, arrays in self.iter_shards([name], device)]
        if not parts:
            raise StoreError(f"{self.root}: the store holds no rows")
        return torch.cat(parts)
