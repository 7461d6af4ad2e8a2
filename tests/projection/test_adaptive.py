"""Adaptive refresh policy: pure functions (issue 3 part 3)."""

import math

import pytest
import torch

from lowrank_train.projection import next_refresh_gap, push_similarity, subspace_overlap, validate_adaptive_options

torch.set_num_threads(1)

POLICY = dict(base_gap=10, max_gap=80, threshold=0.4, growth=2.0)


def history(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    "similarities,gap,expected",
    [
        ((math.nan, 0.9, 0.9), 10, 10),  # history not full: no decision
        ((0.9, 0.9, 0.9), 10, 20),  # stable subspace: grow
        ((0.4, 0.4, 0.4), 10, 20),  # "at or above" the threshold grows
        ((0.9, 0.9, 0.9), 80, 80),  # capped at max_gap
        ((0.9, 0.9, 0.9), 60, 80),
        ((0.1, 0.2, 0.3), 40, 20),  # moving again: shrink
        ((0.1, 0.2, 0.3), 10, 10),  # never below the base gap
    ],
)
def test_next_refresh_gap(similarities, gap, expected):
    assert next_refresh_gap(history(*similarities), gap, **POLICY) == expected


def test_push_similarity_keeps_the_newest():
    h = torch.full((3,), math.nan)
    for value in (0.1, 0.2, 0.3, 0.4):
        h = push_similarity(h, value)
    torch.testing.assert_close(h, history(0.2, 0.3, 0.4))


def test_overlap_is_rotation_and_sign_invariant():
    basis = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))[0]
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))[0]
    flipped = basis @ rotation * torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert float(subspace_overlap(basis, flipped)) == pytest.approx(1.0, abs=1e-5)
    other = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(2)))[0]
    assert float(subspace_overlap(basis, other)) < 0.4


@pytest.mark.parametrize(
    "args,message",
    [
        ((0.0, 2.0, 5, 10, 80), "refresh_threshold"),
        ((1.5, 2.0, 5, 10, 80), "refresh_threshold"),
        ((0.4, 1.0, 5, 10, 80), "refresh_growth"),
        ((0.4, 0.5, 5, 10, 80), "refresh_growth"),
        ((0.4, 2.0, 0, 10, 80), "refresh_history"),
        ((0.4, 2.0, 5, 10, 5), "max_update_gap"),
    ],
)
def test_bad_options(args, message):
    with pytest.raises(ValueError, match=message):
        validate_adaptive_options(*args)
