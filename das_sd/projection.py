"""Seeded random projections R^p -> R^k, generated block by block.

P (p x k) has i.i.d. entries, Rademacher (+-1) or standard Gaussian, scaled by 1/sqrt(k) so that
inner products are preserved in expectation. Rows are generated in fixed blocks, each from its own
generator seeded by (seed, block index): any block can be regenerated alone, the result does not
depend on how many rows are projected at once, and a dense p x k matrix never has to exist. Blocks
are kept in memory only while they fit in ``cache_bytes``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

KINDS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class ProjectorSpec:
    kind: str = "rademacher"
    dim: int = 2048
    seed: int = 0
    block_rows: int = 4096

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"projector kind {self.kind!r}: expected one of {KINDS}")
        if self.dim < 1 or self.block_rows < 1:
            raise ValueError("projector dim and block_rows must be positive")


def _block_seed(seed: int, block: int) -> int:
    digest = hashlib.sha256(f"das-sd-projection:{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BlockProjector:
    """Projects rows of a (n x p) matrix with the P defined by ``spec`` (p = ``num_params``)."""

    def __init__(self, spec: ProjectorSpec, num_params: int, device: torch.device | str = "cpu",
                 cache_bytes: int = 1 << 30):
        self.spec = spec
        self.num_params = int(num_params)
        self.device = torch.device(device)
        self.num_blocks = -(-self.num_params // spec.block_rows)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_blocks = cache_bytes // max(1, spec.block_rows * spec.dim * 4)

    _shared: dict[tuple, "BlockProjector"] = {}

    @classmethod
    def shared(cls, spec: ProjectorSpec, num_params: int, device: torch.device | str = "cpu") -> "BlockProjector":
        """One projector (and one block cache) per (spec, p, device) in the process: feature sets
        that share a projector spec do not each hold a copy of P."""
        key = (spec, int(num_params), str(torch.device(device)))
        if key not in cls._shared:
            if len(cls._shared) >= 4:
                cls._shared.pop(next(iter(cls._shared)))
            cls._shared[key] = cls(spec, num_params, device)
        return cls._shared[key]

    def block(self, index: int) -> torch.Tensor:
        """Rows [index * block_rows, ...) of P, float32, on ``self.device``."""
        if index in self._cache:
            return self._cache[index]
        start = index * self.spec.block_rows
        rows = min(self.spec.block_rows, self.num_params - start)
        gen = torch.Generator().manual_seed(_block_seed(self.spec.seed, index))
        if self.spec.kind == "gaussian":
            block = torch.randn(rows, self.spec.dim, generator=gen)
        else:
            block = torch.randint(0, 2, (rows, self.spec.dim), generator=gen, dtype=torch.int8).float() * 2 - 1
        block = block.mul_(self.spec.dim ** -0.5).to(self.device)
        if len(self._cache) < self._cache_blocks:
            self._cache[index] = block
        return block

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(n x p) -> (n x k) = grads @ P, accumulated in float32."""
        if grads.shape[-1] != self.num_params:
            raise ValueError(f"expected {self.num_params} columns, got {grads.shape[-1]}")
        out = torch.zeros(grads.shape[0], self.spec.dim, dtype=torch.float32, device=self.device)
        rows = self.spec.block_rows
        for b in range(self.num_blocks):
            chunk = grads[:, b * rows:(b + 1) * rows].to(self.device, torch.float32)
            out.addmm_(chunk, self.block(b))
        return out

    def dense(self) -> torch.Tensor:
        """The whole P (p x k). For tests and small problems only."""
        return torch.cat([self.block(b) for b in range(self.num_blocks)])
