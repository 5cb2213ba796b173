import pytest
import torch

from das_sd.projection import BlockProjector, ProjectorSpec

pytestmark = pytest.mark.numerics
# Projections are sums of at most p = 1000 products |g P| <= 4 * 0.5: in float64 two summation orders
# differ by at most 2 * p * u64 * sum |g P| <= 2 * 1000 * 1.1e-16 * 2000 = 4.4e-10 (worst case).
ATOL_F64 = 5e-10


@pytest.mark.parametrize("kind,cache_bytes", [(kind, 0) for kind in ("sparse", "rademacher", "gaussian")]
                         + [("sparse", 20_000), ("sparse", 1 << 30), ("gaussian", 1 << 30)])
def test_projection_equals_dense_matrix_product_and_is_block_size_independent(kind, cache_bytes):
    """Whatever is cached: nothing, a part of P (20 kB: some sparse pieces), or all of it."""
    g = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0)).clamp(-4, 4).double()
    proj = BlockProjector(ProjectorSpec(kind=kind, dim=64, seed=3, block_rows=128), 1000, cache_bytes=cache_bytes)
    dense = proj.dense()
    assert dense.shape == (1000, 64)
    dense = dense.double()  # P's entries are float32 numbers: exact in float64
    assert torch.allclose(proj.project(g), g @ dense, rtol=0, atol=ATOL_F64)
    # same seed, same P whether projected in one call or row by row
    assert torch.allclose(torch.cat([proj.project(g[i:i + 1]) for i in range(5)]), proj.project(g), rtol=0, atol=ATOL_F64)
    # ... or coordinate range by range (ranges that cut generation blocks, as LoRA layers do)
    pieces = None
    for lo, hi in [(0, 100), (100, 129), (129, 700), (700, 1000)]:
        pieces = proj.project_range(g[:, lo:hi], lo, pieces)
    assert torch.allclose(pieces, g @ dense, rtol=0, atol=ATOL_F64)
    # the entries have the right law: +-1/sqrt(k), N(0, 1/k), or s entries +-1/sqrt(s), one per block of k/s
    if kind == "rademacher":
        assert torch.allclose(dense.abs(), torch.full_like(dense, 64 ** -0.5))
    if kind == "sparse":
        nonzero = dense != 0
        assert torch.equal(nonzero.view(1000, 4, 16).sum(dim=2), torch.ones(1000, 4, dtype=torch.long))
        assert torch.equal(dense[nonzero].abs(), torch.full((4000,), 0.5, dtype=torch.float64))
        assert abs(dense[nonzero].sign().mean().item()) < 0.05  # signs balanced
        assert torch.equal((dense ** 2).sum(dim=1), torch.ones(1000, dtype=torch.float64))  # rows of unit norm exactly
    else:
        assert abs(dense.var().item() * 64 - 1) < 0.05


@pytest.mark.parametrize("kind", ["sparse", "rademacher"])
def test_different_seeds_differ_and_inner_products_are_preserved_on_average(kind):
    a = BlockProjector(ProjectorSpec(kind=kind, dim=512, seed=0), 3000)
    b = BlockProjector(ProjectorSpec(kind=kind, dim=512, seed=1), 3000)
    assert not torch.equal(a.dense(), b.dense())
    g = torch.randn(20, 3000, generator=torch.Generator().manual_seed(1))
    ratio = (a.project(g).norm(dim=1) / g.norm(dim=1))
    assert (ratio - 1).abs().max() < 0.2  # JL: sqrt(2 ln(20) / 512) ~ 0.11 per row
    # inner products between correlated rows: same order of accuracy as the dense projector
    h = g + 0.5 * torch.randn(20, 3000, generator=torch.Generator().manual_seed(2))
    cos = torch.nn.functional.cosine_similarity
    assert (cos(a.project(g), a.project(h)) - cos(g, h)).abs().max() < 0.1


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="projector kind"):
        ProjectorSpec(kind="countsketch")
    with pytest.raises(ValueError, match="multiple of nonzeros"):
        ProjectorSpec(kind="sparse", dim=30, nonzeros=4)
    with pytest.raises(ValueError, match="columns"):
        BlockProjector(ProjectorSpec(dim=8), 10).project(torch.zeros(1, 11))
    with pytest.raises(ValueError, match="outside"):
        BlockProjector(ProjectorSpec(dim=8), 10).project_range(torch.zeros(1, 5), 8)


def test_shared_projectors_are_a_bounded_lru_and_clearable():
    from das_sd.projection import SharedProjectors

    specs = [ProjectorSpec("gaussian", 8, seed) for seed in range(4)]
    shared = SharedProjectors(max_entries=3, max_bytes=10_000, cache_bytes=1_000)
    a = shared.get(specs[0], 50)
    assert shared.get(specs[0], 50) is a and shared.get(specs[0], 50, "cpu") is a  # one per (spec, p, device)
    a51 = shared.get(specs[0], 51)
    assert a51 is not a
    assert shared.get(specs[0], 50) is a  # used again: now a51 is the least recently used
    b, c = shared.get(specs[1], 50), shared.get(specs[2], 50)  # a third and a fourth: a51 dropped
    assert len(shared) == 3 and shared.get(specs[0], 50) is a and shared.get(specs[2], 50) is c
    assert shared.get(specs[0], 51) is not a51  # rebuilt, dropping b, the least recently used
    assert len(shared) == 3 and shared.get(specs[2], 50) is c and shared.get(specs[1], 50) is not b
    assert shared.budget() == 3 * 1_000 <= shared.max_bytes

    by_bytes = SharedProjectors(max_entries=10, max_bytes=2_500, cache_bytes=1_000)  # room for two
    first = by_bytes.get(specs[0], 50)
    dense = first.dense()
    by_bytes.get(specs[1], 50), by_bytes.get(specs[2], 50)
    assert len(by_bytes) == 2 and by_bytes.budget() <= 2_500
    again = by_bytes.get(specs[0], 50)
    assert again is not first and torch.equal(again.dense(), dense)  # rebuilt, same P
    by_bytes.clear()
    assert len(by_bytes) == 0 and by_bytes.budget() == 0
    with pytest.raises(ValueError, match="cache_bytes"):
        SharedProjectors(max_entries=2, max_bytes=100, cache_bytes=1_000)


def test_the_process_cache_behind_blockprojector_shared():
    from das_sd.projection import SHARED, clear_shared_projectors

    clear_shared_projectors()
    spec = ProjectorSpec("sparse", 8, 1)
    p = BlockProjector.shared(spec, 40)
    assert BlockProjector.shared(spec, 40) is p and len(SHARED) == 1
    assert SHARED.max_entries == 4 and SHARED.max_bytes == 4 << 30 and p.cache_budget == 1 << 30
    clear_shared_projectors()
    assert len(SHARED) == 0 and BlockProjector.shared(spec, 40) is not p
