"""File helpers: atomic writes (a reader never sees half a file, a killed job leaves the old one
intact), JSON error texts, prompt files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, and rename it into place.

    Args:
        path: The file to create or replace; its directory must exist.
        data: The file's whole new content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (see ``atomic_write_bytes``).

    Args:
        path: The file to create or replace.
        text: The file's whole new content.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON (keys in their given order, a final newline) to ``path``
    atomically (see ``atomic_write_bytes``).

    Args:
        path: The file to create or replace.
        obj: A JSON-serialisable value.
    """
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def json_error(exc: json.JSONDecodeError) -> str:
    """Where and why JSON failed to parse: some of json's messages already end in "at"
    ("Unterminated string starting at"), which a plain "at column N" would double.

    Args:
        exc: The error ``json`` raised.

    Returns:
        The message and position, e.g. ``"Expecting value at line 3 column 5"`` (no line on line 1).
    """
    where = f"line {exc.lineno} column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
    return f"{exc.msg} {where}" if exc.msg.endswith(" at") else f"{exc.msg} at {where}"


def read_prompt_file(path: str | Path, flag: str = "--prompts") -> list[str]:
    """Prompts from a text file: one per line, blank lines and ``#`` comments skipped.

    Args:
        path: A UTF-8 text file.
        flag: The option that named the file, quoted in error messages.

    Returns:
        The prompts, stripped, in file order.

    Raises:
        ValueError: The file cannot be read or decoded, or holds no prompt.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"{flag} {path}: no prompts (one per line; # starts a comment)")
    return prompts


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO', ... for an ``st_mode`` (what a path is when it is not a plain file).

    Args:
        mode: An ``os.stat_result.st_mode``.

    Returns:
        The kind with its article, or ``"not a plain file"`` for any other non-regular kind.
    """
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def not_regular_message(path: str | Path, mode: int, what: str = "file") -> str:
    """The error text for a path that is not a regular file.

    Args:
        path: The path, named first in the message.
        mode: Its ``st_mode``, which says what it is instead.
        what: What was expected there, e.g. ``"store file"``.

    Returns:
        ``"<path>: not a regular file (<kind>); expected a <what>"``.
    """
    return f"{path}: not a regular file ({file_kind(mode)}); expected a {what}"


def check_regular_file(path: str | Path, what: str = "file") -> os.stat_result:
    """``os.stat(path)`` when ``path`` is a regular file; else ValueError naming it (a FIFO or a
    device would block or never end when read; stat itself never blocks).

    Args:
        path: The path to check (symlinks followed).
        what: What the file is to the caller, e.g. ``"prompt file"``; named in the errors.

    Returns:
        The file's ``os.stat`` result.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` cannot be stat'ed, or is not a regular file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(not_regular_message(path, st.st_mode, what))
    return st


def open_regular(path: str | Path, what: str = "file", buffering: int = -1) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only: opened with O_NONBLOCK (opening a FIFO never
    waits for a writer) and refused after fstat unless it is a regular file, so a path swapped for a
    FIFO or a device between a check and the open cannot hang the reader either.

    Args:
        path: The file to open.
        what: What the file is to the caller; named in the errors.
        buffering: As ``open``'s: -1 (default) buffered, 0 unbuffered.

    Returns:
        The file, open for binary reading (blocking again once known to be regular).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` cannot be opened, or is (or became) not a regular file.
    """
    check_regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(not_regular_message(path, mode, what))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def printable(text: object) -> str:
    """``text`` safe to print on a terminal: control characters (C0, DEL, C1, and the other
    non-printing format / separator characters) shown escaped as \\x1b, \\n, \\u2028, ...; a caption
    or file name read from a dataset can then not clear the screen or retitle the window.

    Args:
        text: Any value; ``str(text)`` is what gets escaped.

    Returns:
        The text, unchanged when it is all printable.
    """
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


# safetensors refuses a header longer than this (its MAX_HEADER_SIZE); a length field beyond it, or
# beyond the file, is damage, and reading it would ask for up to 2^64 bytes of memory
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(fh: BinaryIO) -> tuple[dict, int]:
    """(JSON header, byte offset where the data starts) of the safetensors file open as ``fh``
    (binary, at its start). The length field is checked against the file size and safetensors' own
    limit before anything is read. ValueError (json's on bad JSON); callers name the file.

    Args:
        fh: The file, open in binary mode and positioned at its start; left after the header.

    Returns:
        The parsed header (array name -> ``{"dtype", "shape", "data_offsets"}``, maybe
        ``"__metadata__"``) and the absolute offset that ``data_offsets`` count from.

    Raises:
        ValueError: The file is under 8 bytes, the length field exceeds the file or safetensors'
            limit, the header is not JSON (``json.JSONDecodeError``) or not a JSON object.
    """
    size = os.fstat(fh.fileno()).st_size
    if size < 8:
        raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
    header_len = int.from_bytes(fh.read(8), "little")
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"its header length field says {header_len} bytes, more than "
                         + (f"the {size - 8} bytes after it" if size - 8 < MAX_HEADER_BYTES
                            else f"safetensors' limit of {MAX_HEADER_BYTES}"))
    header = json.loads(fh.read(header_len))
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    return header, 8 + header_len


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks so that memory stays flat on multi-GB files.

    Args:
        path: A regular file (see ``open_regular``).
        chunk_bytes: Bytes read at a time.

    Returns:
        The 64-character lowercase hex digest.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` cannot be opened or is not a regular file.
    """
    digest = hashlib.sha256()
    with open_regular(path, buffering=0) as fh:
        buffer = bytearray(chunk_bytes)
        view = memoryview(buffer)
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
