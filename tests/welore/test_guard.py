"""The held-out guard of the default ``strategy="auto"`` (issue 23): it keeps the allocation that loses least."""

import copy
import dataclasses

import pytest
import torch

from lowrank_train.nn.lowrank_linear import LowRankLinear
from lowrank_train.train.config import CompressConfig
from lowrank_train.welore import (
    GUARD_FALLBACK,
    GUARDED,
    STRATEGIES,
    AllocationStrategy,
    WeLoreConfig,
    collect_calibration_statistics,
    compress_model,
    find_block_linears,
    guard_candidates,
    split_calibration,
)
from lowrank_train.welore import compress as compress_module
from lowrank_train.welore.allocation import minmax_scores


@pytest.fixture
def sharp_llama(llama_builder):
    """The conftest LLaMA with larger weights, so that how it is compressed shows in its loss."""
    return llama_builder(initializer_range=0.15)


def _rank_one(name: str) -> AllocationStrategy:
    # Deliberately bad: rank 1 for every matrix, whatever the budget allows.
    return AllocationStrategy(
        name, minmax_scores, weighting="whiten", fixed_threshold=lambda _: 1.0, guard_candidate=True
    )


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    types_a = [type(m) for m in a.modules()]
    types_b = [type(m) for m in b.modules()]
    state_a, state_b = a.state_dict(), b.state_dict()
    return (
        types_a == types_b
        and state_a.keys() == state_b.keys()
        and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    )


@pytest.mark.parametrize("count", [4, 5, 10, 24, 31])
def test_split_is_disjoint_and_covers_the_set(count):
    sequences = [torch.full((1, 8), i) for i in range(count)]
    fit, heldout = split_calibration(sequences)
    fit_ids = [int(s[0, 0]) for s in fit]
    held_ids = [int(s[0, 0]) for s in heldout]
    assert not set(fit_ids) & set(held_ids) and sorted(fit_ids + held_ids) == list(range(count))
    assert len(heldout) == max(2, round(count / 5)) and len(fit) >= 2


def test_split_refuses_a_set_too_small():
    assert split_calibration([torch.zeros(1, 8, dtype=torch.long)] * 3) is None


def test_guard_holds_out_the_last_fifth_and_fits_on_the_rest(llama, calibration, monkeypatch):
    seen = {"fit": [], "heldout": []}
    fit_with = compress_module._compress_with
    score = compress_module.heldout_loss

    def record_fit(model, config, data, *rest):
        seen["fit"].append({tuple(s.reshape(-1).tolist()) for s in data})
        return fit_with(model, config, data, *rest)

    def record_heldout(model, sequences):
        seen["heldout"].append({tuple(s.reshape(-1).tolist()) for s in sequences})
        return score(model, sequences)

    monkeypatch.setattr(compress_module, "_compress_with", record_fit)
    monkeypatch.setattr(compress_module, "heldout_loss", record_heldout)
    report = compress_model(llama, WeLoreConfig(0.3, min_ratio=0.0), calibration)
    everything = {tuple(row.tolist()) for row in calibration}
    candidates = len(guard_candidates())
    # Each candidate fits on four fifths and is scored on the rest; after the scoring the winner is refitted on all.
    assert len(seen["fit"]) == candidates + 1 and len(seen["heldout"]) == candidates
    assert seen["fit"][-1] == everything
    for fit, heldout in zip(seen["fit"][:candidates], seen["heldout"], strict=True):
        assert not fit & heldout and fit | heldout == everything and len(heldout) == 5
    assert (report.guard.fit_sequences, report.guard.heldout_sequences) == (19, 5)


@pytest.mark.parametrize("bad", ["whitened", "whitened-loss"])
def test_guard_avoids_the_bad_candidate_either_way(sharp_llama, calibration, monkeypatch, bad):
    assert set(guard_candidates()) >= {"whitened", "whitened-loss"}
    monkeypatch.setitem(STRATEGIES, bad, _rank_one(bad))
    report = compress_model(sharp_llama, WeLoreConfig(0.3, min_ratio=0.0), calibration)
    good = next(name for name in ("whitened", "whitened-loss") if name != bad)
    guard = report.guard
    assert guard.winner == good == report.strategy and guard.fallback is None
    assert guard.losses[bad] > guard.losses[good] and guard.margin == pytest.approx(
        guard.losses[bad] - guard.losses[good]
    )
    assert guard.seconds > 0.0 and report.param_reduction >= 0.3
    assert report.to_dict()["guard"]["winner"] == good


def test_guarded_result_equals_forcing_the_winner_on_every_sequence(llama, calibration):
    dense = copy.deepcopy(llama)
    report = compress_model(llama, WeLoreConfig(0.3, min_ratio=0.0), calibration)
    assert report.guard.refit and "then refitted on all" in report.guard.summary()
    forced_model = copy.deepcopy(dense)
    forced = compress_model(forced_model, WeLoreConfig(0.3, report.guard.winner, min_ratio=0.0), calibration)
    assert _same_model(llama, forced_model)
    assert dataclasses.replace(report, guard=None) == forced and forced.guard is None


def test_without_refit_the_guard_keeps_the_winner_fitted_on_four_fifths(llama, calibration):
    dense = copy.deepcopy(llama)
    report = compress_model(llama, WeLoreConfig(0.3, min_ratio=0.0, guard_refit=False), calibration)
    assert not report.guard.refit
    fit, _ = split_calibration(list(calibration))
    forced_model = copy.deepcopy(dense)
    config = WeLoreConfig(0.3, report.guard.winner, min_ratio=0.0, guard_refit=False)
    forced = compress_model(forced_model, config, torch.stack(fit))
    assert _same_model(llama, forced_model)
    assert dataclasses.replace(report, guard=None) == forced and forced.guard is None


def test_forcing_a_strategy_bypasses_the_guard(llama, calibration, monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("the guard ran")

    monkeypatch.setattr(compress_module, "heldout_loss", fail)
    report = compress_model(llama, WeLoreConfig(0.3, "whitened", min_ratio=0.0), calibration)
    assert report.guard is None and report.strategy == "whitened"


def test_a_failing_candidate_leaves_the_model_dense(llama, calibration, monkeypatch):
    dense = copy.deepcopy(llama)
    calls = []

    def fail_second(model, sequences):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("scoring failed")
        return 1.0

    monkeypatch.setattr(compress_module, "heldout_loss", fail_second)
    with pytest.raises(RuntimeError, match="scoring failed"):
        compress_model(llama, WeLoreConfig(0.3, min_ratio=0.0), calibration)
    assert _same_model(llama, dense) and not any(isinstance(m, LowRankLinear) for m in llama.modules())


def test_too_small_calibration_falls_back_with_a_message(llama, calibration):
    small = calibration[:3]
    with pytest.warns(UserWarning, match="held-out guard cannot run .*too few"):
        report = compress_model(llama, WeLoreConfig(0.3, min_ratio=0.0), small)
    assert report.strategy == GUARD_FALLBACK == report.guard.winner and report.guard.losses == {}
    assert "too few" in report.guard.fallback and "unguarded" in report.guard.summary()


def test_precomputed_statistics_fall_back_with_a_message(llama, calibration):
    stats = collect_calibration_statistics(llama, find_block_linears(llama), list(calibration[:, None]))
    with pytest.warns(UserWarning, match="precomputed statistics"):
        report = compress_model(llama, WeLoreConfig(0.3, min_ratio=0.0), stats)
    assert report.strategy == GUARD_FALLBACK and report.guard.fallback.startswith("precomputed statistics")


def test_the_guard_is_the_default_of_the_library_and_the_cli():
    assert WeLoreConfig(0.2).strategy == GUARDED == CompressConfig().strategy
    assert CompressConfig().welore_config().strategy == GUARDED
    with pytest.raises(ValueError, match="'auto'"):
        WeLoreConfig(0.2, "magic")
    with pytest.raises(ValueError, match="not a strategy name"):
        AllocationStrategy(GUARDED, minmax_scores)
