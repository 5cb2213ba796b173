"""Seeded random projections R^p -> R^k, generated block by block.

Three kinds of P (p x k), each with E[P P^T] = I so that inner products are preserved in expectation:
- ``rademacher``: i.i.d. +-1 / sqrt(k) entries;
- ``gaussian``: i.i.d. N(0, 1/k) entries;
- ``sparse``: a sparse Johnson-Lindenstrauss transform (Kane & Nelson's block construction): the k
  outputs are cut into s equal blocks and every input coordinate goes to one random output of each
  block with a random sign, scaled by 1 / sqrt(s). Projecting a row costs O(s p) instead of O(p k)
  and P takes O(s p) memory instead of O(p k): for LoRA gradients of SD 1.x (p in the millions) the
  dense product costs more than the forward and backward passes it projects.
Rows of P are generated in fixed blocks, each from its own generator seeded by (seed, block index):
any block can be regenerated alone, the result does not depend on how many rows or which coordinate
range are projected at once, and a dense p x k matrix never has to exist. Blocks are kept in memory
only while they fit in ``cache_bytes``.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .registry import PROJECTOR_KINDS, check_choice
from .seeds import generator


@dataclass(frozen=True)
class ProjectorSpec:
    """Which P: kind, output dimension and seed (docs/method.md §7); the same spec gives the same P.

    Attributes:
        kind: ``"sparse"`` (default), ``"rademacher"`` or ``"gaussian"`` (``registry.PROJECTOR_KINDS``).
        dim: k, the projected dimension (``--dim``).
        seed: Seed of P (``--projection-seed``).
        nonzeros: s, the nonzeros per input coordinate (``--projection-nonzeros``); sparse kind only,
            where k must be a multiple of it.
        block_rows: Rows of P (input coordinates) generated per block, each block from its own seed.

    Raises:
        ValueError: If ``kind`` is unknown, a size is not positive, or (sparse) k is not a multiple of s.
    """
    kind: str = "sparse"
    dim: int = 2048
    seed: int = 0
    nonzeros: int = 4  # s, sparse kind only
    block_rows: int = 4096

    def __post_init__(self):
        check_choice("projector kind", self.kind, PROJECTOR_KINDS)
        if self.dim < 1 or self.block_rows < 1 or self.nonzeros < 1:
            raise ValueError("projector dim, nonzeros and block_rows must be positive")
        if self.kind == "sparse" and self.dim % self.nonzeros:
            raise ValueError(f"sparse projection: dim (k = {self.dim}) must be a multiple of nonzeros "
                             f"(s = {self.nonzeros})")


class BlockProjector:
    """Projects rows of a (n x p) matrix with the P defined by ``spec`` (p = ``num_params``).

    Args:
        spec: Which P.
        num_params: p, the input dimension (the number of LoRA parameters projected).
        device: Where the products run and cached blocks live.
        cache_bytes: The most bytes of P kept cached (dense blocks or sparse pieces, 1 GiB by
            default); the rest is regenerated at each use.
    """

    def __init__(self, spec: ProjectorSpec, num_params: int, device: torch.device | str = "cpu",
                 cache_bytes: int = 1 << 30):
        self.spec = spec
        self.num_params = int(num_params)
        self.device = torch.device(device)
        self.num_blocks = -(-self.num_params // spec.block_rows)
        self._cache: dict[int, object] = {}
        self._pieces: dict[tuple[int, int, int], torch.Tensor] = {}
        self._cache_bytes = cache_bytes
        self._piece_bytes = 0
        # a sparse P is kept once, as the pieces it is multiplied in; its blocks are regenerated on
        # a cache miss (cheap: s random integers per row)
        self._cache_blocks = 0 if spec.kind == "sparse" else cache_bytes // max(1, spec.block_rows * spec.dim * 4)

    @classmethod
    def shared(cls, spec: ProjectorSpec, num_params: int, device: torch.device | str = "cpu") -> "BlockProjector":
        """The process's projector for (spec, p, device), from ``SHARED`` (see ``SharedProjectors``).

        Args:
            spec: Which P.
            num_params: p, the input dimension.
            device: Where the products run.

        Returns:
            The shared projector, built on first use.
        """
        return SHARED.get(spec, num_params, device)

    @property
    def cache_budget(self) -> int:
        """The most bytes of P this projector keeps cached (blocks or sparse pieces)."""
        return self._cache_bytes

    def _rows_in_block(self, index: int) -> int:
        return min(self.spec.block_rows, self.num_params - index * self.spec.block_rows)

    def block(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows [index * block_rows, ...) of P: dense (rows, k) float32 on ``self.device``, or for
        the sparse kind (buckets, signs), each (rows, s).

        Args:
            index: The block number, 0 to ``num_blocks`` - 1.

        Returns:
            The dense block, or for the sparse kind the output column of each nonzero (int64) and
            its value +-1/sqrt(s) (float32), both on the CPU.
        """
        if index in self._cache:
            return self._cache[index]
        rows, k = self._rows_in_block(index), self.spec.dim
        gen = generator(f"das-sd-projection:{self.spec.seed}:{index}")
        if self.spec.kind == "sparse":
            s = self.spec.nonzeros
            buckets = torch.randint(0, k // s, (rows, s), generator=gen) + torch.arange(s) * (k // s)
            signs = (torch.randint(0, 2, (rows, s), generator=gen, dtype=torch.int8).float() * 2 - 1) * s ** -0.5
            block = (buckets, signs)
        elif self.spec.kind == "gaussian":
            block = torch.randn(rows, k, generator=gen).mul_(k ** -0.5).to(self.device)
        else:
            block = (torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8).float() * 2 - 1)
            block = block.mul_(k ** -0.5).to(self.device)
        if len(self._cache) < self._cache_blocks:
            self._cache[index] = block
        return block

    def _sparse_piece(self, index: int, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of sparse block ``index`` as a transposed (k, hi - lo) CSR matrix. Callers
        project the same coordinate ranges (one per layer) again and again: pieces are cached, up to
        ``cache_bytes`` in all (those past it are rebuilt at each use, the cached ones stay)."""
        key = (index, lo, hi)
        if key not in self._pieces:
            buckets, signs = self.block(index)
            buckets, signs = buckets[lo:hi], signs[lo:hi]
            s = self.spec.nonzeros
            with warnings.catch_warnings():  # torch calls sparse CSR "beta" on every construction
                warnings.simplefilter("ignore")
                piece = torch.sparse_coo_tensor(
                    torch.stack([buckets.reshape(-1), torch.arange(hi - lo).repeat_interleave(s)]),
                    signs.reshape(-1), (self.spec.dim, hi - lo), check_invariants=True)
                piece = piece.coalesce().to_sparse_csr().to(self.device)
            nbytes = sum(t.numel() * t.element_size() for t in (piece.crow_indices(), piece.col_indices(),
                                                                  piece.values()))
            if self._piece_bytes + nbytes > self._cache_bytes:
                return piece
            self._pieces[key] = piece
            self._piece_bytes += nbytes
        return self._pieces[key]

    def project_range(self, grads: torch.Tensor, start: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Add grads (n x m), the coordinates [start, start + m) of each row, projected, to ``out`` (n x k).
        Accumulated in float32, or in float64 for float64 gradients (P's entries are float32 numbers,
        exact in either).

        Args:
            grads: (n, m) gradients: coordinates [start, start + m) of each row.
            start: The first coordinate, 0-based.
            out: An (n, k) accumulator, added to in place; None starts from zeros on ``self.device``.

        Returns:
            ``out``: (n, k), float32 (float64 for float64 ``grads``) when created here.

        Raises:
            ValueError: If the coordinates fall outside [0, ``num_params``).
        """
        stop = start + grads.shape[-1]
        if start < 0 or stop > self.num_params:
            raise ValueError(f"coordinates [{start}, {stop}) outside the {self.num_params} projected ones")
        dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
        if out is None:
            out = torch.zeros(grads.shape[0], self.spec.dim, dtype=dtype, device=self.device)
        rows = self.spec.block_rows
        sparse = self.spec.kind == "sparse"
        # a sparse block projects as (k x m) @ (m x n): its products are accumulated in place in that
        # layout and added to ``out`` transposed once; at large k, writing a fresh (k x n) product
        # per block and adding it transposed cost more than the products themselves
        acc = torch.zeros(self.spec.dim, grads.shape[0], dtype=dtype, device=self.device) if sparse else None
        for index in range(start // rows, -(-stop // rows)):
            lo, hi = max(start, index * rows), min(stop, (index + 1) * rows)
            chunk = grads[:, lo - start:hi - start].to(self.device, dtype)
            if sparse:
                acc.addmm_(self._sparse_piece(index, lo - index * rows, hi - index * rows).to(dtype), chunk.T)
            else:
                out += chunk @ self.block(index)[lo - index * rows:hi - index * rows].to(dtype)
        if sparse:
            out += acc.T
        return out

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(n x p) -> (n x k) = grads @ P, accumulated in float32 (float64 for float64 grads).

        Args:
            grads: (n, p) gradients, all coordinates.

        Returns:
            The (n, k) projections on ``self.device``.

        Raises:
            ValueError: If ``grads`` does not have ``num_params`` columns.
        """
        if grads.shape[-1] != self.num_params:
            raise ValueError(f"expected {self.num_params} columns, got {grads.shape[-1]}")
        return self.project_range(grads, 0)

    def dense(self) -> torch.Tensor:
        """The whole P (p x k). For tests and small problems only.

        Returns:
            P, (p, k) float32 on ``self.device``.
        """
        return self.project(torch.eye(self.num_params, device=self.device))


class SharedProjectors:
    """Projectors shared by the featurizers of a process, one per (spec, p, device): feature sets
    and Attributors with one projector spec then hold one copy of P's cache, not one each.

    A least-recently-used cache bounded twice: at most ``max_entries`` projectors, and at most
    ``max_bytes`` of cache budget in all (each projector caches up to its ``cache_bytes``, 1 GiB by
    default); the least recently used projectors are dropped first. A dropped projector is rebuilt
    on its next use, with the same P (regenerated from its seed): only time is lost, never results.
    ``clear()`` drops them all (to free their memory, or in tests).

    Args:
        max_entries: The most projectors held (at least 1).
        max_bytes: The most cache budget of all held projectors together.
        cache_bytes: The cache budget of each projector built here (at most ``max_bytes``).

    Raises:
        ValueError: If ``max_entries`` < 1 or ``cache_bytes`` > ``max_bytes``.
    """

    def __init__(self, max_entries: int = 4, max_bytes: int = 4 << 30, cache_bytes: int = 1 << 30):
        if max_entries < 1 or cache_bytes > max_bytes:
            raise ValueError(f"shared projectors: max_entries ({max_entries}) must be >= 1 and cache_bytes "
                             f"({cache_bytes}) at most max_bytes ({max_bytes})")
        self.max_entries, self.max_bytes, self.cache_bytes = max_entries, max_bytes, cache_bytes
        self._entries: OrderedDict[tuple, BlockProjector] = OrderedDict()
        self._lock = threading.Lock()  # hosts featurize from several threads

    def get(self, spec: ProjectorSpec, num_params: int, device: torch.device | str = "cpu") -> BlockProjector:
        """The projector for (spec, p, device), built on first use; the least recently used ones
        beyond the bounds are dropped. Thread-safe.

        Args:
            spec: Which P.
            num_params: p, the input dimension.
            device: Where the products run.

        Returns:
            The projector.
        """
        key = (spec, int(num_params), str(torch.device(device)))
        with self._lock:
            projector = self._entries.pop(key, None) or BlockProjector(spec, num_params, device, self.cache_bytes)
            self._entries[key] = projector  # most recently used last
            while len(self._entries) > self.max_entries or self.budget() > self.max_bytes:
                self._entries.popitem(last=False)
            return projector

    def budget(self) -> int:
        """Bytes the held projectors may cache, in all.

        Returns:
            The sum of their ``cache_budget``.
        """
        return sum(p.cache_budget for p in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every held projector and its cached blocks."""
        with self._lock:
            self._entries.clear()


SHARED = SharedProjectors()


def clear_shared_projectors() -> None:
    """Drop every shared projector and its cached blocks (``SHARED.clear()``)."""
    SHARED.clear()
