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
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save

from .io import atomic_write_bytes, atomic_write_json, file_sha256
from .store_chunks import ArrayChunks, array_chunks
from .store_integrity import StoreError, check_file, read_manifest, remember_verified

FORMAT_VERSION = 1  # checksums were added without a bump: stores without them open, unverified
MANIFEST = "manifest.json"
# identity fields added after stores were first written, with the value every store without them
# was built with: such a store still matches (and resumes) where the field has that value
IDENTITY_DEFAULTS = {"prediction_type": "epsilon", "buckets": None, "model_family": "sd"}
__all__ = ["FORMAT_VERSION", "IDENTITY_DEFAULTS", "MANIFEST", "FeatureStore", "Row", "StoreError", "blocks_of",
           "identity_with_defaults"]


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


class FeatureStore:
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

    # ---- writing ------------------------------------------------------------------------------

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

    # ---- reading ------------------------------------------------------------------------------

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

    # ---- indexes (scorer arrays) --------------------------------------------------------------

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
        on_disk = FeatureStore(self.root, read_manifest(self.root / MANIFEST, FORMAT_VERSION))
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
