"""A caller's train/eval modes are left as they were found (das_sd/models/modes.py)."""

from __future__ import annotations

import pytest
from torch import nn

from das_sd.models.modes import eval_mode, restored_modes


def model() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Linear(2, 2)))
    m.train()
    m[1].eval()  # a mixed state: a plain train()/eval() could not put it back
    return m


def modes(m: nn.Module) -> list[bool]:
    return [x.training for x in m.modules()]


def test_eval_mode_inside_the_block_and_the_callers_mixed_modes_after():
    m = model()
    before = modes(m)
    with eval_mode(m):
        assert not any(modes(m))
    assert modes(m) == before == [True, True, False, True, True]


def test_modes_come_back_after_an_error_and_added_modules_keep_theirs():
    m = model()
    before = modes(m)
    with pytest.raises(RuntimeError), restored_modes(m):
        m.train()
        m.add_module("adapter", nn.Linear(2, 2).eval())
        raise RuntimeError("boom")
    assert modes(m)[:-1] == before and m.adapter.training is False
