"""Warm-up + cosine schedule against its closed form, and the peak kept in the param groups."""

import math

import pytest
import torch

from lowrank_train.train.schedule import lr_factor, set_learning_rate


@pytest.mark.parametrize(("max_steps", "warmup", "floor"), [(10, 0, 0.1), (100, 10, 0.0), (7, 3, 0.5)])
def test_lr_factor_closed_form(max_steps, warmup, floor):
    factors = [lr_factor(s, max_steps=max_steps, warmup_steps=warmup, min_lr_ratio=floor) for s in range(max_steps)]
    for step in range(warmup):
        assert factors[step] == pytest.approx((step + 1) / (warmup + 1))
    assert factors[warmup] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(floor)
    middle = warmup + (max_steps - 1 - warmup) / 2
    if middle.is_integer():
        assert factors[int(middle)] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 2)))
    after = factors[warmup:]
    assert all(a >= b for a, b in zip(after[:-1], after[1:], strict=True))


def test_constant_after_warmup():
    assert [lr_factor(s, max_steps=5, warmup_steps=1, min_lr_ratio=0.1, kind="constant") for s in range(5)] == [
        0.5,
        1.0,
        1.0,
        1.0,
        1.0,
    ]


def test_set_learning_rate_keeps_the_peak():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.2)
    set_learning_rate(optimizer, 0.5)
    set_learning_rate(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert optimizer.param_groups[0]["initial_lr"] == 0.2
