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
__all__ = ["FORMAT_VERSION", "MANIFEST", "FeatureStore", "Row", "StoreError", "blocks_of"]


@dataclass(frozen=True)
class Row:
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


def blocks_of(rows: list[Row], shard_size: int) -> list[list[Row]]:
    """``rows`` cut into shard-sized blocks, in order."""
    return [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]


class FeatureStore:
    """A folder of safetensors feature shards with its ``manifest.json``: the identity it was built
    for (model, LoRA, dataset, featurizer settings), the shards and index files with their sha256,
    and the current index generation.

    Open one with ``FeatureStore.open(path)`` (raises StoreError naming the file and field when it
    is missing, damaged or of another format version); ``FeatureStore.create`` starts a new one.
    Files are checked against their checksums on first read in a process.
    """

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self._written: dict[str, dict] = {}  # checksums of index files written, not yet recorded

    # ---- create / open -----------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, identity: dict, shard_size: int = 256, info: dict | None = None,
               moved_shards: bool = False) -> "FeatureStore":
        """A new, empty store. Refused in a folder holding store files but no manifest, except
        ``moved_shards``: shards a killed merge moved in (each is checked when it is adopted)."""
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
        ``clean``: remove temp files of killed writes (False to only read, as `das-sd verify`)."""
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
        root = Path(root).expanduser().resolve()
        if (root / MANIFEST).exists():
            store = cls.open(root, identity)
            if info:
                store.manifest["info"].update(info)
            return store
        return cls.create(root, identity, shard_size, info, moved_shards)

    def check_identity(self, identity: dict) -> None:
        differences = _diff(identity, self.manifest["identity"])
        if differences:
            raise StoreError(f"{self.root}: this store was built for something else:\n  "
                             + "\n  ".join(differences)
                             + "\nUse another --store folder, or the settings the store was built with.")

    # ---- rows ----------------------------------------------------------------------------------

    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    def rows(self) -> list[Row]:
        return [Row(k, p, c) for s in self.manifest["shards"] for k, p, c in zip(s["keys"], s["paths"], s["captions"])]

    def keys(self) -> list[str]:
        return [k for s in self.manifest["shards"] for k in s["keys"]]

    def __len__(self) -> int:
        return sum(len(s["keys"]) for s in self.manifest["shards"])

    def missing(self, rows: list[Row]) -> list[Row]:
        """The rows (in the given order) whose keys the store does not hold yet."""
        have = set(self.keys())
        return [r for r in rows if r.key not in have]

    def plan(self, rows: list[Row]) -> list[list[Row]]:
        """Missing rows cut into shard-sized blocks, in order: the work left to do."""
        return blocks_of(self.missing(rows), self.shard_size)

    # ---- writing ------------------------------------------------------------------------------

    def shard_name(self, index: int) -> str:
        return f"features-{index:05d}.safetensors"

    def append_shard(self, rows: list[Row], arrays: dict[str, torch.Tensor], extra: dict | None = None) -> None:
        """Write one shard (atomically), then record it in the manifest (atomically)."""
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
        ``checksum``: the one the other store recorded, checked here and carried over."""
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
        """{"sha256", "bytes"} recorded for a file of the store; None for one an older das-sd wrote."""
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
        shards = self.manifest["shards"]
        return sorted(shards[0]["arrays"]) if shards else []

    def shard_paths(self) -> list[Path]:
        """The feature shards in row order, each checked against its checksum."""
        return [self._checked(s["file"], "shard") for s in self.manifest["shards"]]

    def array_files(self, index: str | None = None) -> list[Path]:
        """The files of the feature shards (``index`` None) or of index set ``index``, in row order,
        each checked against its checksum."""
        return self.shard_paths() if index is None else self._current_index(index)

    def array_chunks(self, name: str, index: str | None = None, chunk_rows: int | None = None,
                     chunk_bytes: int = 8 << 20) -> Iterator[ArrayChunks]:
        """Array ``name`` of each file (as ``array_files``) in row order, to be read in chunks of
        ``chunk_rows`` rows (default: ``chunk_bytes`` of the file): a whole-store scan holding two
        chunks in memory (das_sd.store_chunks). Every file is checked before the first is read."""
        return array_chunks(self.array_files(index), name, chunk_rows, chunk_bytes)

    def iter_shards(self, names: list[str], device: str = "cpu") -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
        """(shard entry, {name: tensor}) per shard, memory-mapped by safetensors."""
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
        """One named array for all rows, concatenated in row order."""
        parts = [arrays[name] for _, arrays in self.iter_shards([name], device)]
        if not parts:
            raise StoreError(f"{self.root}: the store holds no rows")
        return torch.cat(parts)

    # ---- indexes (scorer arrays) --------------------------------------------------------------

    def keys_digest(self) -> str:
        return hashlib.sha256("\n".join(self.keys()).encode()).hexdigest()

    @property
    def store_id(self) -> str:
        """Short id of what the store holds (identity + rows): provenance written next to results."""
        h = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        h.update(self.keys_digest().encode())
        return "das-" + h.hexdigest()[:12]

    def new_generation(self) -> str:
        """A fresh name part for index files: a rebuild never overwrites the files in use."""
        return hashlib.sha256(f"{time.time_ns()}:{os.getpid()}:{self.root}".encode()).hexdigest()[:8]

    def write_index_files(self, name: str, shards: Iterable[dict[str, torch.Tensor]],
                          generation: str | None = None) -> list[str]:
        """Write an index as one file per feature shard (same rows), consuming ``shards`` lazily so
        that one shard is in memory at a time. The files are not in use until ``record_indexes``
        switches the manifest to them; pass one ``generation`` for all sets of an index run."""
        generation = generation or self.new_generation()
        files = []
        for i, arrays in enumerate(shards):
            file = f"index-{name}-{generation}-{i:05d}.safetensors"
            self._written[file] = self._write(file, save({k: v.detach().cpu().contiguous() for k, v in arrays.items()}))
            files.append(file)
        return files

    def record_indexes(self, built: dict[str, tuple[list[str], dict]]) -> None:
        """Switch every set of ``built`` ({set: (files, info)}) to its new files in one manifest write,
        then delete the files they replace: a kill at any point leaves one consistent generation."""
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
        self.record_indexes({name: (files, info)})

    def remove_orphan_indexes(self) -> list[str]:
        """Delete index files no manifest entry names (written by an index run killed before its
        switch); returns their names. Not while another process is indexing this store."""
        used = {f for name in self.manifest.get("indexes", {}) for f in self.index_files(name)}
        on_disk = FeatureStore(self.root, read_manifest(self.root / MANIFEST, FORMAT_VERSION))
        used |= {f for name in on_disk.manifest["indexes"] for f in on_disk.index_files(name)}  # a newer writer's
        orphans = sorted(p.name for p in self.root.glob("index-*.safetensors") if p.name not in used)
        for file in orphans:
            (self.root / file).unlink(missing_ok=True)
        return orphans

    def index_files(self, name: str) -> list[str]:
        info = self.index_info(name) or {}
        return info.get("files") or ([info["file"]] if "file" in info else [])

    def index_info(self, name: str) -> dict | None:
        return self.manifest.get("indexes", {}).get(name)

    def index_is_current(self, name: str) -> bool:
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
        """The index files of ``name`` in row order (for streaming over them)."""
        yield from self._current_index(name)

    def load_index(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for path in self._current_index(name):
            try:
                with safe_open(str(path), framework="pt", device=device) as fh:
                    for k in fh.keys():
                        parts.setdefault(k, []).append(fh.get_tensor(k))
            except Exception as exc:
                raise StoreError(f"{path}: damaged index ({exc})") from exc
        return {k: torch.cat(v) for k, v in parts.items()}
