"""Reading one array of a store file in row chunks, for scans over stores of any size (das_sd.topk).

A chunk is read with one plain ``preadv`` at the array's byte offset (from the file's safetensors
header) into one of two reused buffers, the next chunk in a thread while the caller works on this
one: memory stays at two chunks whatever the file size, and a cold scan runs at disk speed (a
memory-mapped tensor would be paged in at random and kept in the page cache). The files come from
``FeatureStore.array_chunks``, which has checked each against its checksum before the first read.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .io import open_regular, read_safetensors_header
from .store_integrity import StoreError

DTYPES = {"I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}
SIDE_KINDS = ("norm", "scale")  # per-row arrays stored beside an index's low-precision vectors


def _layout(path: Path, name: str) -> tuple[torch.dtype, list[int], int]:
    """(dtype, shape, byte offset) of array ``name`` in a safetensors file, from its header."""
    try:
        with open_regular(path, "store file") as fh:
            header, data_start = read_safetensors_header(fh)
    except StoreError:
        raise
    except (OSError, ValueError) as exc:
        text = str(exc)
        raise StoreError(text if text.startswith(f"{path}:") else f"{path}: cannot read it ({text})") from None
    if name not in header:
        raise StoreError(f"{path}: no array {name!r}")
    meta = header[name]
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    if dtype not in DTYPES:
        raise StoreError(f"{path}: array {name!r} has dtype {dtype}; expected one of {sorted(DTYPES)}")
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if (not isinstance(shape, list) or not shape or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets)):
        raise StoreError(f"{path}: array {name!r} has a damaged header entry ({meta})")
    if offsets[1] - offsets[0] != math.prod(shape) * torch.tensor([], dtype=DTYPES[dtype]).element_size():
        raise StoreError(f"{path}: array {name!r}: its byte range {offsets} does not fit its shape {shape}")
    return DTYPES[dtype], shape, data_start + offsets[0]


class ArrayChunks:
    """One array of one file, read in row chunks: iterating yields (first row, block), each block
    valid until the next-but-one chunk is read into its buffer. ``buffers`` (two uint8 tensors,
    grown on demand) are shared by the files of one scan.

    Args:
        path: A safetensors file of the store, already checked against its checksum.
        name: The array to read, e.g. ``"psi_das"``; its first dimension is the row.
        chunk_rows: Rows per chunk; None: as many as fit in ``chunk_bytes`` (at least one).
        chunk_bytes: Bytes per chunk when ``chunk_rows`` is None.
        buffers: Two uint8 CPU tensors, replaced in place by larger ones when too small for a chunk.

    Raises:
        StoreError: The file cannot be read, lacks the array, or its header entry is damaged or has
            an unsupported dtype.
    """

    def __init__(self, path: Path, name: str, chunk_rows: int | None, chunk_bytes: int,
                 buffers: list[torch.Tensor]) -> None:
        self.path, self.name = path, name
        self.dtype, self.shape, self.offset = _layout(path, name)
        self.row_bytes = int(torch.tensor([], dtype=self.dtype).element_size() * max(1, math.prod(self.shape[1:])))
        self.chunk_rows = chunk_rows or max(1, chunk_bytes // self.row_bytes)
        for i, b in enumerate(buffers):  # uninitialised: every byte handed out is read first
            if b.numel() < self.row_bytes * self.chunk_rows:
                buffers[i] = torch.empty(self.row_bytes * self.chunk_rows, dtype=torch.uint8)
        self.buffers = buffers

    @property
    def rows(self) -> int:
        """The array's row count (its first dimension)."""
        return self.shape[0]

    def side_arrays(self) -> dict[str, torch.Tensor]:
        """The per-row arrays stored beside low-precision vectors, {"norm", "scale"} as present (row
        norms bound the rounding error; int8 rows need their scales), whole (one float per row).

        Returns:
            ``{"norm": (rows,), "scale": (rows,)}`` CPU tensors, each key only where the file has
            ``norm.<name>`` / ``scale.<name>``.

        Raises:
            StoreError: An int8 array has no ``scale.<name>`` beside it.
        """
        with safe_open(str(self.path), framework="pt", device="cpu") as fh:
            names = set(fh.keys())
            side = {kind: fh.get_tensor(f"{kind}.{self.name}") for kind in SIDE_KINDS if f"{kind}.{self.name}" in names}
        if "scale" not in side and self.dtype == torch.int8:
            raise StoreError(f"{self.path}: 'scale.{self.name}' is missing (an int8 index stores one scale per row)")
        return side

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        rows = self.rows
        starts = list(range(0, rows, self.chunk_rows))
        with open(self.path, "rb", buffering=0) as fh, ThreadPoolExecutor(1) as pool:
            if hasattr(os, "posix_fadvise"):  # a larger readahead window for a cold scan
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)

            def read(i: int) -> torch.Tensor:  # reads release the GIL: the next chunk loads meanwhile
                start = starts[i]
                n = min(rows, start + self.chunk_rows) - start
                buffer = self.buffers[i % 2][:n * self.row_bytes]
                got = os.preadv(fh.fileno(), [memoryview(buffer.numpy())], self.offset + start * self.row_bytes)
                if got != buffer.numel():
                    raise StoreError(f"{self.path}: file ends early (truncated?)")
                return buffer.view(self.dtype).view(n, *self.shape[1:])

            pending = pool.submit(read, 0) if starts else None
            for i, start in enumerate(starts):
                block = pending.result()
                pending = pool.submit(read, i + 1) if i + 1 < len(starts) else None
                yield start, block


def array_chunks(paths: list[Path], name: str, chunk_rows: int | None, chunk_bytes: int) -> Iterator[ArrayChunks]:
    """``ArrayChunks`` of ``name`` for each file in turn, sharing two buffers (paths already checked).

    Args:
        paths: The store's files holding the array, in row order.
        name: The array to read from each.
        chunk_rows: Rows per chunk; None: derived from ``chunk_bytes``.
        chunk_bytes: Bytes per chunk when ``chunk_rows`` is None.

    Yields:
        One ``ArrayChunks`` per file, opened when reached (a damaged file raises ``StoreError`` then).
    """
    buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(2)]
    for path in paths:
        yield ArrayChunks(path, name, chunk_rows, chunk_bytes, buffers)
