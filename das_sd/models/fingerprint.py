"""Content fingerprints of model folders, single-file checkpoints and LoRA files.

A feature store, a LoRA record and a generated PNG all name the exact base model and LoRA they come
from. Hashing a multi-GB SD checkpoint takes seconds, so per-file digests are cached by
(path, size, mtime) in ``$DAS_SD_HOME/file-hashes.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..io import atomic_write_text, check_regular_file, open_regular, read_safetensors_header

# Files that describe a pipeline folder; anything else (READMEs, images, our build log) is ignored.
MODEL_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
IGNORED_NAMES = {"das_sd_build.json", "README.md"}


def das_sd_home() -> Path:
    """das-sd's cache folder: ``$DAS_SD_HOME``, else ``~/.cache/das-sd`` (not created here).

    Returns:
        The folder, with ``~`` expanded.
    """
    return Path(os.environ.get("DAS_SD_HOME") or Path.home() / ".cache" / "das-sd").expanduser()


def _cache_path() -> Path:
    return das_sd_home() / "file-hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache))
    except OSError:
        pass  # the cache is an optimisation only


def _cached_digest(path: Path, kind: str, compute, cache: dict | None = None) -> str:
    """``compute(path)``, cached by (path, kind, size, mtime); ``cache`` lets callers batch saves."""
    st = path.stat()
    stamp, entry = f"{st.st_size}:{st.st_mtime_ns}", f"{path}#{kind}"
    own_cache = cache is None
    cache = _load_cache() if own_cache else cache
    hit = cache.get(entry)
    if hit and hit[0] == stamp:
        return hit[1]
    digest = compute(path)
    cache[entry] = [stamp, digest]
    if own_cache:
        _save_cache(cache)
    return digest


def _file_bytes_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path, cache: dict | None = None) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime) in ``$DAS_SD_HOME/file-hashes.json``.

    Args:
        path: The file; only a regular file is read.
        cache: A cache dict loaded by the caller, who saves it (to batch many files); None loads and
            saves the cache file here.

    Returns:
        The hex digest (64 characters, no prefix).
    """
    return _cached_digest(Path(path).resolve(), "bytes", _file_bytes_sha256, cache)


def model_fingerprint(folder: str | Path) -> str:
    """Hash of a base model: of every config and weight file of a diffusers pipeline folder (names
    and contents), or of a single-file checkpoint's bytes.

    In a folder, files ending in .safetensors, .json, .txt or .model count, except
    ``das_sd_build.json``, ``README.md`` and hidden (dot) files and folders; their sorted relative
    paths and byte digests are hashed. A single file's fingerprint is the sha256 of its bytes, the
    hash A1111 and Civitai show for it (their "Model hash" is its first 10 characters).

    Args:
        folder: The pipeline folder or single-file checkpoint.

    Returns:
        "sha256:" followed by the hex digest.

    Raises:
        ValueError: When ``folder`` is missing, neither a folder nor a regular file, or unreadable.
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        if not folder.exists():
            raise ValueError(f"{folder}: model folder or checkpoint file not found")
        check_regular_file(folder, "diffusers pipeline folder or single-file checkpoint")
        try:
            return f"sha256:{file_sha256(folder)}"
        except OSError as exc:
            raise ValueError(f"{folder}: cannot read it ({exc.strerror or exc})") from None
    cache = _load_cache()
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES
                   and p.name not in IGNORED_NAMES and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(file_sha256(path, cache).encode())
    _save_cache(cache)
    return f"sha256:{h.hexdigest()}"


def tensors_sha256(path: str | Path) -> str:
    """Hash of a safetensors file's tensors (sorted names, dtypes, shapes, bytes), header metadata
    excluded: safetensors writes metadata keys in no fixed order, so raw file bytes are not stable.

    Args:
        path: The safetensors file; only a regular file is read.

    Returns:
        The hex digest (64 characters, no prefix).
    """
    path = Path(path)
    with open_regular(path, "safetensors file") as fh:
        header, base = read_safetensors_header(fh)
        h = hashlib.sha256()
        for name in sorted(k for k in header if k != "__metadata__"):
            entry = header[name]
            start, end = entry["data_offsets"]
            fh.seek(base + start)
            h.update(f"{name}|{entry['dtype']}|{entry['shape']}|".encode())
            h.update(fh.read(end - start))
    return h.hexdigest()


def lora_fingerprint(path: str | Path) -> str:
    """Fingerprint of a LoRA file: ``tensors_sha256`` of its tensors, cached like ``file_sha256``.

    Args:
        path: The LoRA .safetensors file.

    Returns:
        "sha256:" followed by the hex digest.

    Raises:
        FileNotFoundError: When the file does not exist.
        ValueError: When it is not a regular file, cannot be read, or is not a readable
            safetensors file; the message names the path.
    """
    path = Path(path).resolve()
    check_regular_file(path, "LoRA .safetensors file")  # a FIFO would block, a device never end
    try:
        return f"sha256:{_cached_digest(path, 'tensors', tensors_sha256)}"
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        if str(exc).startswith(f"{path}:"):  # open_regular's own message names the file already
            raise
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def short(fingerprint: str, n: int = 10) -> str:
    """The first characters of a fingerprint's digest, for names and display.

    Args:
        fingerprint: A fingerprint such as "sha256:ab12..." (a bare digest works too).
        n: How many hex characters to keep.

    Returns:
        The first ``n`` characters after the "sha256:" prefix.
    """
    return fingerprint.split(":", 1)[-1][:n]


def provenance(base: str | Path, lora: str | Path | None = None) -> dict:
    """Names and fingerprints of a base model folder and an optional LoRA file, for metadata.

    Args:
        base: The base pipeline folder or single-file checkpoint.
        lora: The LoRA file; None for a base model alone.

    Returns:
        ``base_name``, ``base_fingerprint`` and ``base_hash`` (its ``short`` form), and with a
        LoRA ``lora_name`` (its folder's name for ``pytorch_lora_weights.safetensors``, else the
        file stem), ``lora_fingerprint`` and ``lora_hash``.

    Raises:
        ValueError: When the base folder or the LoRA file cannot be read (FileNotFoundError when
            the LoRA file does not exist).
    """
    base = Path(base)
    # a checkpoint file is named by its stem, as A1111 names models in infotexts
    info = {"base_name": base.stem if base.is_file() else base.name, "base_fingerprint": model_fingerprint(base)}
    info["base_hash"] = short(info["base_fingerprint"])
    if lora is not None:
        lora = Path(lora)
        info["lora_name"] = lora.parent.name if lora.name == "pytorch_lora_weights.safetensors" else lora.stem
        info["lora_fingerprint"] = lora_fingerprint(lora)
        info["lora_hash"] = short(info["lora_fingerprint"])
    return info
