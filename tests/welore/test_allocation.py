"""Rank allocation: budget bisection, the LRC/N-LRC rule, the registry and the paper's tau table."""

import pytest
import torch

from lowrank_train.welore.allocation import (
    STRATEGIES,
    AllocationStrategy,
    allocate_ranks,
    get_strategy,
    is_low_rank_component,
    paper_tau,
)

SHAPES = {
    "q": (64, 64),
    "k": (16, 64),
    "v": (16, 64),
    "up": (160, 64),
    "down": (64, 160),
    "q2": (64, 64),
}


def _spectra(seed: int = 0) -> dict[str, torch.Tensor]:
    # Heavy-tailed spectra with different decay per matrix, like pretrained weights.
    generator = torch.Generator().manual_seed(seed)
    spectra = {}
    for index, (name, shape) in enumerate(SHAPES.items()):
        r = min(shape)
        decay = 0.5 + index * 0.4
        values = (torch.arange(1, r + 1, dtype=torch.float64) ** -decay) * (
            1 + 0.01 * torch.rand(r, generator=generator)
        )
        spectra[name] = values.sort(descending=True).values.float()
    return spectra


def _reduction(ranks, lrc) -> float:
    before = sum(m * n for m, n in SHAPES.values())
    after = sum(ranks[k] * sum(SHAPES[k]) if lrc[k] else SHAPES[k][0] * SHAPES[k][1] for k in SHAPES)
    return 1 - after / before


DATA_FREE = ["welore", "uniform"]
WEIGHTED = ["whitened", "whitened-energy"]  # the weighting only changes which spectrum is read


@pytest.mark.parametrize("strategy", DATA_FREE + WEIGHTED)
@pytest.mark.parametrize("target", [0.05, 0.1, 0.2, 0.3, 0.5, 0.7])
def test_bisection_hits_target_within_one_rank_per_matrix(strategy, target):
    allocation = allocate_ranks(_spectra(), SHAPES, target, strategy, min_ratio=0.0)
    achieved = _reduction(allocation.ranks, allocation.lrc)
    assert achieved == pytest.approx(allocation.param_reduction)
    one_rank_per_matrix = sum(m + n for m, n in SHAPES.values()) / sum(m * n for m, n in SHAPES.values())
    assert target <= achieved <= target + one_rank_per_matrix


@pytest.mark.parametrize("strategy", DATA_FREE + WEIGHTED)
def test_threshold_is_the_smallest_that_fits(strategy):
    # Any lower candidate threshold (one more direction kept somewhere) must miss the budget.
    spectra = _spectra(1)
    allocation = allocate_ranks(spectra, SHAPES, 0.3, strategy, min_ratio=0.0)
    rule = get_strategy(strategy)
    scores = torch.cat([rule.score(v, SHAPES[k]) for k, v in spectra.items()]).unique()
    lower = scores[scores < allocation.threshold].max()
    ranks = {k: max(1, int((rule.score(v, SHAPES[k]) >= lower).sum())) for k, v in spectra.items()}
    lrc = {k: is_low_rank_component(ranks[k], SHAPES[k], 0.0) for k in SHAPES}
    assert _reduction(ranks, lrc) < 0.3


@pytest.mark.parametrize("min_ratio", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("strategy", ["welore", "uniform", "whitened"])
def test_lrc_split_follows_min_ratio(min_ratio, strategy):
    allocation = allocate_ranks(_spectra(), SHAPES, 0.2, strategy, min_ratio=min_ratio)
    assert allocation.param_reduction >= 0.2
    for name, (m, n) in SHAPES.items():
        proposed = allocation.proposed[name]
        expected = 1 - proposed / min(m, n) >= min_ratio and proposed * (m + n) < m * n
        assert allocation.lrc[name] == expected
        assert allocation.ranks[name] == (proposed if expected else min(m, n))


def test_uniform_spreads_the_budget_evenly():
    allocation = allocate_ranks(_spectra(), SHAPES, 0.4, "uniform", min_ratio=0.0)
    kept = [allocation.ranks[k] * sum(s) / (s[0] * s[1]) for k, s in SHAPES.items()]
    assert max(kept) - min(kept) < 0.1  # every matrix keeps about the same fraction of its parameters


def test_welore_rule_is_minmax_threshold():
    spectra = _spectra()
    allocation = allocate_ranks(spectra, SHAPES, 0.3, "welore", min_ratio=0.0)
    for name, values in spectra.items():
        normalized = (values - values.min()) / (values.max() - values.min())
        assert allocation.proposed[name] == max(1, int((normalized.double() >= allocation.threshold - 1e-9).sum()))


def test_welore_table_uses_paper_tau():
    allocation = allocate_ranks(_spectra(), SHAPES, 0.5, "welore-table")
    assert allocation.threshold == pytest.approx(0.175)
    assert paper_tau(0.1) == pytest.approx(0.0225)
    assert paper_tau(0.7) == pytest.approx(0.26)
    assert paper_tau(0.3) == pytest.approx((0.0225 + 0.175) / 2)
    with pytest.raises(ValueError, match="tau table covers"):
        allocate_ranks(_spectra(), SHAPES, 0.05, "welore-table")


def test_registry():
    assert {"welore", "welore-table", "uniform", "whitened", "asvd", "whitened-energy", "whitened-loss"} <= set(
        STRATEGIES
    )
    assert get_strategy("whitened-loss").needs_calibration and get_strategy("whitened-loss").objective == "loss"
    assert get_strategy("whitened").needs_calibration and not get_strategy("welore").needs_calibration
    with pytest.raises(ValueError, match="unknown allocation strategy"):
        get_strategy("svd-magic")
    with pytest.raises(ValueError, match="weighting"):
        AllocationStrategy("bad", lambda s, shape: s, weighting="fisher")


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5])
def test_target_outside_unit_interval(target):
    with pytest.raises(ValueError, match=r"target must be a fraction in \(0, 1\)"):
        allocate_ranks(_spectra(), SHAPES, target)


def test_unreachable_target():
    with pytest.raises(ValueError, match="out of reach"):
        allocate_ranks(_spectra(), SHAPES, 0.99, "welore", min_ratio=0.0)


def test_mismatched_spectra():
    spectra = _spectra()
    spectra["q"] = spectra["q"][:10]
    with pytest.raises(ValueError, match="singular values for a"):
        allocate_ranks(spectra, SHAPES, 0.2)
