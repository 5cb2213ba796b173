import pytest
import torch

from das_sd.projection import BlockProjector, ProjectorSpec


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_equals_dense_matrix_product_and_is_block_size_independent(kind):
    g = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    proj = BlockProjector(ProjectorSpec(kind=kind, dim=64, seed=3, block_rows=128), 1000, cache_bytes=0)
    dense = proj.dense()
    assert dense.shape == (1000, 64)
    assert torch.allclose(proj.project(g), g @ dense, atol=1e-4)
    # same seed, same P whether projected in one call or row by row
    assert torch.allclose(torch.cat([proj.project(g[i:i + 1]) for i in range(5)]), proj.project(g), atol=1e-5)
    # the entries have the right law: +-1/sqrt(k) or N(0, 1/k)
    if kind == "rademacher":
        assert torch.allclose(dense.abs(), torch.full_like(dense, 64 ** -0.5))
    assert abs(dense.var().item() * 64 - 1) < 0.05


def test_different_seeds_differ_and_norms_are_preserved_on_average():
    a = BlockProjector(ProjectorSpec(dim=512, seed=0), 3000)
    b = BlockProjector(ProjectorSpec(dim=512, seed=1), 3000)
    assert not torch.equal(a.dense(), b.dense())
    g = torch.randn(20, 3000, generator=torch.Generator().manual_seed(1))
    ratio = (a.project(g).norm(dim=1) / g.norm(dim=1)).mean().item()
    assert 0.9 < ratio < 1.1


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="projector kind"):
        ProjectorSpec(kind="sparse")
    with pytest.raises(ValueError, match="columns"):
        BlockProjector(ProjectorSpec(dim=8), 10).project(torch.zeros(1, 11))
