"""Seeds and generators (das_sd/seeds.py): text seeds pinned to the values stores and LDS caches were
made with, and a seeded global RNG that leaves the caller's state as it was."""

from __future__ import annotations

import torch

from das_sd.featurize.settings import noise_for
from das_sd.seeds import generator, seeded_global_rng, text_seed


def test_text_seeds_are_the_ones_results_were_made_with():
    # values of the formulas each module used before they shared one helper: a change here changes
    # every projector, featurizer noise draw and LDS output, so existing stores would no longer match
    assert text_seed("das-sd-projection:7:3") == 6804021152356236431
    assert text_seed("das-sd-noise:0:key:10") == 4362398292006623458
    assert text_seed("das-sd-lds:0:key:10", drop_low_bit=True) == 2858544932683818901
    assert noise_for(0, "key", 10, (3,)).tolist() == [0.7813632488250732, -1.6200892925262451, 1.038421869277954]
    assert all(0 <= text_seed(f"x{i}", low) < 2 ** 63 for i in range(50) for low in (False, True))


def test_generators_from_ints_and_texts():
    assert torch.equal(torch.randn(5, generator=generator(42)), torch.randn(5, generator=torch.Generator().manual_seed(42)))
    a = torch.randn(5, generator=generator("das-sd-noise:0:key:10"))
    assert torch.equal(a, torch.randn(5, generator=torch.Generator().manual_seed(4362398292006623458)))
    assert not torch.equal(a, torch.randn(5, generator=generator("das-sd-noise:0:key:11")))


def test_seeded_global_rng_draws_as_after_manual_seed_and_restores_the_callers_state():
    torch.manual_seed(123)
    torch.rand(7)  # some state of the caller's, not a freshly seeded one
    before = torch.random.get_rng_state()
    with seeded_global_rng(5):
        inside = torch.randn(4)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(5)
    assert torch.equal(inside, torch.randn(4))
    torch.random.set_rng_state(before)
    try:
        with seeded_global_rng(5):
            raise KeyError("boom")
    except KeyError:
        pass
    assert torch.equal(torch.random.get_rng_state(), before)  # on an error too
