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

from .io import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class StoreError(ValueError):
    """A store that is missing, damaged or built for something else; the message says what."""


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
    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    # ---- create / open -----------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, identity: dict, shard_size: int = 256, info: dict | None = None) -> "FeatureStore":
        root = Path(root).expanduser().resolve()
        if (root / MANIFEST).exists():
            raise StoreError(f"{root}: a store already exists here")
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "identity": identity,
            "info": info or {},
            "shard_size": int(shard_size),
            "shards": [],
            "complete": False,
            "indexes": {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        store = cls(root, manifest)
        store._save_manifest()
        return store

    @classmethod
    def open(cls, root: str | Path, identity: dict | None = None) -> "FeatureStore":
        """Open an existing store; with ``identity``, refuse it unless it matches exactly."""
        root = Path(root).expanduser().resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise StoreError(f"{root}: no feature store here (no {MANIFEST})")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: damaged manifest ({exc.msg} at line {exc.lineno})") from None
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{path}: store format version {version!r}; this das-sd reads version {FORMAT_VERSION}")
        for name in ("identity", "shards", "shard_size"):
            if name not in manifest:
                raise StoreError(f"{path}: damaged manifest (no {name!r})")
        store = cls(root, manifest)
        if identity is not None:
            store.check_identity(identity)
        for tmp in root.glob(".*.tmp"):  # leftovers of a killed write
            tmp.unlink(missing_ok=True)
        return store

    @classmethod
    def open_or_create(cls, root: str | Path, identity: dict, shard_size: int = 256,
                       info: dict | None = None) -> "FeatureStore":
        root = Path(root).expanduser().resolve()
        if (root / MANIFEST).exists():
            store = cls.open(root, identity)
            if info:
                store.manifest["info"].update(info)
            return store
        return cls.create(root, identity, shard_size, info)

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
        atomic_write_bytes(self.root / name, save(tensors))
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

    def adopt_shard(self, source: Path, entry: dict) -> None:
        """Move a shard written by another store (a partial store of the same identity) in as the
        next shard. Rename first, manifest second: rerun after a kill, it finds the file in place."""
        name = self.shard_name(len(self.manifest["shards"]))
        target = self.root / name
        if Path(source).is_file():
            os.replace(source, target)
        elif not target.is_file():
            raise StoreError(f"{source}: shard listed in its manifest is missing")
        self.manifest["shards"].append({k: v for k, v in entry.items() if k != "block"} | {"file": name})
        self.manifest["complete"] = False
        self._save_manifest()

    def mark_complete(self, complete: bool = True) -> None:
        self.manifest["complete"] = complete
        self._save_manifest()

    def _save_manifest(self) -> None:
        atomic_write_json(self.root / MANIFEST, self.manifest)

    # ---- reading ------------------------------------------------------------------------------

    def array_names(self) -> list[str]:
        shards = self.manifest["shards"]
        return sorted(shards[0]["arrays"]) if shards else []

    def iter_shards(self, names: list[str], device: str = "cpu") -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
        """(shard entry, {name: tensor}) per shard, memory-mapped by safetensors."""
        for shard in self.manifest["shards"]:
            path = self.root / shard["file"]
            if not path.is_file():
                raise StoreError(f"{path}: shard listed in the manifest is missing")
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

    def write_index_files(self, name: str, shards: Iterable[dict[str, torch.Tensor]]) -> list[str]:
        """Write an index as one file per feature shard (same rows), consuming ``shards`` lazily so
        that one shard is in memory at a time. Names carry a new generation: a killed rebuild never
        mixes into the index in use, which ``record_index`` replaces."""
        generation = hashlib.sha256(f"{time.time_ns()}:{name}".encode()).hexdigest()[:8]
        files = []
        for i, arrays in enumerate(shards):
            file = f"index-{name}-{generation}-{i:05d}.safetensors"
            atomic_write_bytes(self.root / file, save({k: v.detach().cpu().contiguous() for k, v in arrays.items()}))
            files.append(file)
        return files

    def record_index(self, name: str, files: list[str], info: dict) -> None:
        old = [f for f in self.index_files(name) if f not in files]
        self.manifest.setdefault("indexes", {})[name] = info | {"files": files, "rows": len(self),
                                                               "keys_digest": self.keys_digest()}
        self._save_manifest()
        for file in old:
            (self.root / file).unlink(missing_ok=True)

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
        return [self.root / f for f in self.index_files(name)]

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
