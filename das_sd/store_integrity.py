"""Integrity of a feature store: the manifest's schema, and a sha256 per shard and index file.

One flipped byte in a shard or index file still parses as safetensors, and the scores it gives are
wrong without any error (a lambda a million times too large, a top-1 score 10^7 times too high). So
every file's sha256 and size are recorded in the manifest when it is written (``checksums``), and a
file is checked before a process first reads it; the check is remembered per (path, inode, size,
mtime, ctime), so later reads in the same process cost one stat. Stores written before checksums
existed have none: their files are read unchecked and ``das-sd verify`` (das_sd.store_verify) lists
them as unverified.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .io import file_sha256, json_error
from .registry import AUTOCAST_DTYPES, MODEL_FAMILIES, OUTPUT_FUNCTIONS, PREDICTION_TYPES, PROJECTOR_KINDS, RESIDUAL_FORMS

if TYPE_CHECKING:
    from collections.abc import Iterable


class StoreError(ValueError):
    """A store that is missing, damaged or built for something else; the message says what."""


# ---- checksums ---------------------------------------------------------------------------------

_VERIFIED: dict[tuple, str] = {}  # stat key -> sha256 that matched (process-wide: stores are reopened often)
# Off only to time cold reads (the check would bring the files into the page cache first).
VERIFY_ON_READ = os.environ.get("DAS_SD_VERIFY_ON_READ", "1") != "0"


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def remember_verified(path: Path, sha256: str) -> None:
    """Mark a file this process has just written (its bytes hashed in memory) as checked.

    Args:
        path: The file, as it is now on disk (its inode, size and times are part of the record).
        sha256: Its hex digest; later checks against the same digest skip rehashing.
    """
    _VERIFIED[_stat_key(path)] = sha256


def checksum_problem(path: Path, expected: dict | None) -> str | None:
    """Why ``path`` does not match its recorded checksum, or None (also when none is recorded).

    The file is hashed once per process and stat key; a size mismatch is reported without hashing.

    Args:
        path: The file to check; must exist.
        expected: The manifest's ``{"sha256", "bytes"}`` for it, or None when none was recorded.

    Returns:
        A short description of the mismatch (sizes or digest prefixes), or None when it matches.
    """
    if expected is None:
        return None
    key = _stat_key(path)
    if _VERIFIED.get(key) == expected["sha256"]:
        return None
    if key[2] != expected["bytes"]:
        return f"{key[2]} bytes, {expected['bytes']} recorded when it was written"
    found = file_sha256(path)
    if found != expected["sha256"]:
        return f"sha256 {found[:12]}..., {expected['sha256'][:12]}... recorded when it was written"
    _VERIFIED[key] = found
    return None


def damaged_message(path: Path, root: Path, problem: str) -> str:
    """The error text for a store file whose contents changed after it was written, with the fix
    (reindex for an index file, a new store for a feature shard).

    Args:
        path: The damaged file; a name starting ``index-`` marks an index file.
        root: The store directory, quoted in the suggested commands.
        problem: What does not match, as ``checksum_problem`` says it.

    Returns:
        The message, naming ``path`` first.
    """
    index = path.name.startswith("index-")
    fix = (f"`das-sd index --store {root}` rewrites the index" if index
           else "a damaged feature shard cannot be rebuilt in place: featurize into a new --store folder")
    return (f"{path}: damaged {'index file' if index else 'shard'}: its contents changed after it was "
            f"written ({problem}). "
            f"Run `das-sd verify --store {root}` to check the whole store; {fix}.")


def check_file(path: Path, expected: dict | None, root: Path) -> None:
    """Raise StoreError naming ``path`` and `das-sd verify` when it does not match its checksum.
    Skipped when ``DAS_SD_VERIFY_ON_READ=0`` was set when das-sd was imported.

    Args:
        path: The file about to be read.
        expected: Its recorded ``{"sha256", "bytes"}``, or None (an older store: not checked).
        root: The store directory, for the message.

    Raises:
        StoreError: The file's size or sha256 differs from the recorded one.
    """
    problem = checksum_problem(path, expected) if VERIFY_ON_READ else None
    if problem:
        raise StoreError(damaged_message(path, root, problem))


# ---- manifest schema ---------------------------------------------------------------------------

_PLAIN_FILE = re.compile(r"[^./\\\x00][^/\\\x00]*")  # a name in STORE: no folder, no '..', no hidden file
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Fields:
    """Type checks that name the manifest and the field, e.g. 'shards[3].rows'."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, name: str, what: str, value) -> None:
        raise StoreError(f"{self.path}: damaged manifest: field {name!r} must be {what} "
                         f"(found {type(value).__name__} {_short(value)})")

    def dict(self, name: str, value) -> dict:
        if not isinstance(value, dict):
            self.fail(name, "an object", value)
        return value

    def list(self, name: str, value, length: int | None = None) -> list:
        if not isinstance(value, list):
            self.fail(name, "a list", value)
        if length is not None and len(value) != length:
            self.fail(name, f"a list of {length} items", value)
        return value

    def int(self, name: str, value, minimum: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(name, f"an integer >= {minimum}", value)
        return value

    def bool(self, name: str, value) -> bool:
        if not isinstance(value, bool):
            self.fail(name, "true or false", value)
        return value

    def choice(self, name: str, value, options) -> str:
        if not isinstance(value, str) or value not in options:
            self.fail(name, "one of " + ", ".join(json.dumps(o) for o in options), value)
        return value

    def str(self, name: str, value, pattern: re.Pattern | None = None, what: str = "a string") -> str:
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(name, what, value)
        return value

    def strings(self, name: str, value, length: int | None = None) -> list[str]:
        for i, item in enumerate(self.list(name, value, length)):
            self.str(f"{name}[{i}]", item)
        return value

    def file(self, name: str, value) -> str:
        return self.str(name, value, _PLAIN_FILE, "a file name inside the store (no folder)")


def _short(value) -> str:
    text = json.dumps(value)[:40] if not isinstance(value, (bytes, bytearray)) else repr(value[:20])
    return text if len(text) < 40 else text[:37] + "..."


def read_manifest(path: Path, format_version: int) -> dict:
    """The manifest at ``path``, or StoreError naming the file and, for a bad field, the field.

    Args:
        path: The store's ``manifest.json``.
        format_version: The only format version accepted.

    Returns:
        The parsed manifest, with absent optional fields (``info``, ``complete``, ``indexes``,
        ``checksums``) filled with their empty defaults.

    Raises:
        StoreError: The file cannot be read, is not UTF-8 JSON holding an object, has another
            format version, lacks ``identity``, ``shards`` or ``shard_size``, or has a bad field
            (see ``check_manifest``).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path}: damaged manifest (not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
                         f"{exc.start})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: damaged manifest ({json_error(exc)})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{path}: damaged manifest (a JSON {type(manifest).__name__}, not an object)")
    version = manifest.get("format_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise StoreError(f"{path}: damaged manifest: field 'format_version' must be the integer {format_version} "
                         f"(found {type(version).__name__} {_short(version)})")
    if version != format_version:
        raise StoreError(f"{path}: store format version {version!r}; this das-sd reads version {format_version}")
    for name in ("identity", "shards", "shard_size"):
        if name not in manifest:
            raise StoreError(f"{path}: damaged manifest (no {name!r})")
    check_manifest(path, manifest)
    return manifest


def check_manifest(path: Path, manifest: dict) -> None:
    """Types and consistency of every field das-sd reads; raises on the first bad one. Absent
    optional fields are set to their defaults in ``manifest`` as a side effect.

    Args:
        path: The manifest's path, named in the errors.
        manifest: The parsed manifest, holding ``identity``, ``shards`` and ``shard_size``.

    Raises:
        StoreError: A field is missing or has the wrong type or range, a shard's lists do not
            match its row count, a key appears in two shards, or a file name is not a plain name
            inside the store.
    """
    f = _Fields(path)
    check_identity(f, f.dict("identity", manifest["identity"]))
    info = f.dict("info", manifest.setdefault("info", {}))
    for name in ("base_path", "lora_path", "dataset_root", "dataset_format"):
        if info.get(name) is not None:
            f.str(f"info.{name}", info[name])
    f.int("shard_size", manifest["shard_size"], 1)
    if not isinstance(manifest.setdefault("complete", False), bool):
        f.fail("complete", "true or false", manifest["complete"])
    keys, files = set(), set()
    for i, shard in enumerate(f.list("shards", manifest["shards"])):
        at = f"shards[{i}]"
        f.dict(at, shard)
        for name in ("file", "rows", "arrays", "keys", "paths", "captions"):
            if name not in shard:
                f.fail(f"{at}.{name}", "present", None)
        files.add(f.file(f"{at}.file", shard["file"]))
        rows = f.int(f"{at}.rows", shard["rows"])
        for name in ("keys", "paths", "captions"):
            f.strings(f"{at}.{name}", shard[name], rows)
        for name, spec in f.dict(f"{at}.arrays", shard["arrays"]).items():
            dtype, shape = f.list(f"{at}.arrays.{name}", spec, 2)
            f.str(f"{at}.arrays.{name}[0]", dtype)
            for j, size in enumerate(f.list(f"{at}.arrays.{name}[1]", shape)):
                f.int(f"{at}.arrays.{name}[1][{j}]", size)
        if "block" in shard:
            f.int(f"{at}.block", shard["block"])
        repeated = keys.intersection(shard["keys"])
        if repeated:
            f.fail(f"{at}.keys", "keys no other shard holds", sorted(repeated)[:3])
        keys.update(shard["keys"])
    for name, index in f.dict("indexes", manifest.setdefault("indexes", {})).items():
        at = f"indexes.{name}"
        f.dict(at, index)
        if "files" in index:
            for j, file in enumerate(f.list(f"{at}.files", index["files"])):
                f.file(f"{at}.files[{j}]", file)
        elif "file" in index:  # a single index file, as the first das-sd wrote it
            f.file(f"{at}.file", index["file"])
        else:
            f.fail(f"{at}.files", "present", None)
        f.int(f"{at}.rows", index.get("rows"))
        f.str(f"{at}.keys_digest", index.get("keys_digest"))
        if "lambda" in index and (not isinstance(index["lambda"], (int, float)) or isinstance(index["lambda"], bool)):
            f.fail(f"{at}.lambda", "a number", index["lambda"])
    for file, checksum in f.dict("checksums", manifest.setdefault("checksums", {})).items():
        at = f"checksums.{file}"
        f.dict(at, checksum)
        f.str(f"{at}.sha256", checksum.get("sha256"), _SHA256, "64 lowercase hex digits")
        f.int(f"{at}.bytes", checksum.get("bytes"))


# ---- identity ------------------------------------------------------------------------------------

COMPUTE_DTYPES = tuple(AUTOCAST_DTYPES.values())
STORE_DTYPES = ("float32", "float16", "bfloat16")
# what `das-sd attribute` reads from the identity (a store made by das-sd featurize has them all)
ATTRIBUTE_FIELDS = ("feature_sets", "base_fingerprint", "lora_fingerprint", "resolution")


def check_identity(f: _Fields, identity: dict) -> None:
    """Types of the identity fields das-sd reads, where present (stores made by hand for tests
    hold other, minimal identities; ``require_identity`` asks for those a command cannot do without).

    Args:
        f: The manifest's field checker, which names the manifest in its errors.
        identity: The manifest's ``identity`` object.

    Raises:
        StoreError: A present field has the wrong type or an unknown value.
    """
    if "feature_sets" in identity:
        sets = f.dict("identity.feature_sets", identity["feature_sets"])
        if not sets:
            f.fail("identity.feature_sets", "a non-empty object (feature set name -> featurizer settings)", sets)
        for name, settings in sets.items():
            check_featurizer_settings(f, f"identity.feature_sets.{name}", settings)
    for name in ("base_fingerprint", "lora_fingerprint"):
        if name in identity:
            f.str(f"identity.{name}", identity[name])
    if "resolution" in identity:
        f.int("identity.resolution", identity["resolution"], 1)
    if "lora_parameters" in identity:
        f.int("identity.lora_parameters", identity["lora_parameters"])
    if "compute_dtype" in identity:
        f.choice("identity.compute_dtype", identity["compute_dtype"], COMPUTE_DTYPES)
    if "store_dtype" in identity:
        f.choice("identity.store_dtype", identity["store_dtype"], STORE_DTYPES)
    if "prediction_type" in identity:
        f.choice("identity.prediction_type", identity["prediction_type"], PREDICTION_TYPES)
    if "model_family" in identity:
        f.choice("identity.model_family", identity["model_family"], MODEL_FAMILIES)
    if identity.get("buckets") is not None:
        buckets = f.dict("identity.buckets", identity["buckets"])
        for name in ("resolution", "min_reso", "max_reso", "step"):
            f.int(f"identity.buckets.{name}", buckets.get(name), 1)


def check_featurizer_settings(f: _Fields, at: str, settings: object) -> None:
    """A feature set's recorded FeaturizerSettings: each field present has its type and range, and
    a sparse projector's k is a multiple of its nonzeros s (absent fields take their defaults).

    Args:
        f: The manifest's field checker, which names the manifest in its errors.
        at: The settings' field path, e.g. ``"identity.feature_sets.das"``.
        settings: The recorded settings; must be an object.

    Raises:
        StoreError: ``settings`` is not an object, or a field has the wrong type or range.
    """
    from .featurize.settings import FeaturizerSettings

    f.dict(at, settings)
    choices = {"output": OUTPUT_FUNCTIONS, "projector": PROJECTOR_KINDS, "residual": RESIDUAL_FORMS}
    minimum = {"num_timesteps": 1, "projection_dim": 1, "projection_nonzeros": 1, "residual_timesteps": 0}  # 0: the feature timesteps
    for name, value in settings.items():
        if name in choices:
            f.choice(f"{at}.{name}", value, choices[name])
        elif name in minimum:
            f.int(f"{at}.{name}", value, minimum[name])
        elif name in ("noise_seed", "projection_seed"):
            if not isinstance(value, int) or isinstance(value, bool):
                f.fail(f"{at}.{name}", "an integer", value)
        elif name == "normalize":
            f.bool(f"{at}.{name}", value)
        elif name == "timesteps" and value is not None:
            if not isinstance(value, list) or not value:
                f.fail(f"{at}.{name}", "null or a non-empty list of timesteps", value)
            for j, t in enumerate(value):
                f.int(f"{at}.{name}[{j}]", t)
    defaults = FeaturizerSettings()
    kind = settings.get("projector", defaults.projector)
    dim = settings.get("projection_dim", defaults.projection_dim)
    nonzeros = settings.get("projection_nonzeros", defaults.projection_nonzeros)
    if kind == "sparse" and dim % nonzeros:
        f.fail(f"{at}.projection_dim", f"a multiple of projection_nonzeros ({nonzeros}) for the sparse projector", dim)


def require_identity(path: Path, identity: dict, fields: Iterable[str] = ATTRIBUTE_FIELDS,
                     needed_by: str = "das-sd") -> None:
    """StoreError naming the manifest and the identity fields ``needed_by`` cannot do without.

    Args:
        path: The manifest's path, named in the error.
        identity: The store's identity.
        fields: The fields that must be present; default: those ``das-sd attribute`` reads.
        needed_by: The command that needs them, named in the error.

    Raises:
        StoreError: Any of ``fields`` is absent from ``identity`` (all missing ones are named).
    """
    missing = [name for name in fields if name not in identity]
    if missing:
        raise StoreError(f"{path}: damaged manifest: no {', '.join('identity.' + m for m in missing)} "
                         f"({needed_by} needs {'it' if len(missing) == 1 else 'them'}; `das-sd featurize` writes "
                         "every identity field)")
