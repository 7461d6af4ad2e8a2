"""The held-out guard of ``strategy="auto"`` on three architectures (issue 23): LLaMA, Gemma 2 and GPT-NeoX.

They differ where allocation rules were suspected to: Gemma 2 normalises each sublayer's output before the
residual add and scales tied embeddings; GPT-NeoX has a parallel residual, LayerNorms with bias, a fused QKV
projection and untied embeddings. Tiny random models with large weights, so that how a model is compressed shows
in its loss.
"""

import copy

import pytest
import torch

from lowrank_train.welore import (
    GUARD_FALLBACK,
    STRATEGIES,
    AllocationStrategy,
    WeLoreConfig,
    compress_model,
    guard_candidates,
)
from lowrank_train.welore import compress as compress_module
from lowrank_train.welore.allocation import minmax_scores

from .conftest import build_llama

FAMILIES = ["llama", "gemma2", "gpt-neox"]


def build(family: str) -> torch.nn.Module:
    """A 2-layer model of ``family`` with a 128-token vocabulary and weights drawn with std 0.15 (seed 0)."""
    import transformers

    torch.set_num_threads(1)
    if family == "llama":
        return build_llama(initializer_range=0.15)
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "gemma2":
        config = transformers.Gemma2Config(**sizes, num_key_value_heads=2, head_dim=12, sliding_window=16)
        config._attn_implementation = "eager"
        return transformers.Gemma2ForCausalLM(config).eval()
    config = transformers.GPTNeoXConfig(
        **sizes, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False
    )
    return transformers.GPTNeoXForCausalLM(config).eval()


def _rank_one(name: str) -> AllocationStrategy:
    # Deliberately bad: rank 1 for every matrix, whatever the budget allows.
    return AllocationStrategy(
        name, minmax_scores, weighting="whiten", fixed_threshold=lambda _: 1.0, guard_candidate=True
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_each_candidate_wins_once(family, calibration, monkeypatch):
    # The same model twice: once "whitened" is made the bad rule, once "whitened-loss"; the guard keeps the other.
    model = build(family)
    winners = {}
    for bad in ("whitened", "whitened-loss"):
        with monkeypatch.context() as patch:
            patch.setitem(STRATEGIES, bad, _rank_one(bad))
            report = compress_model(copy.deepcopy(model), WeLoreConfig(0.3, min_ratio=0.0), calibration)
        guard = report.guard
        assert guard.fallback is None and set(guard.losses) == set(guard_candidates())
        assert guard.losses[bad] > min(guard.losses.values()) and report.strategy == guard.winner != bad
        winners[bad] = guard.winner
    assert winners == {"whitened": "whitened-loss", "whitened-loss": "whitened"}


@pytest.mark.parametrize("family", FAMILIES)
def test_heldout_part_never_reaches_the_statistics(family, calibration, monkeypatch):
    # Whatever a candidate measures (statistics, sensitivities, the prompts of its generated tokens) comes from the
    # fitting part; the held-out part is only scored.
    fitted, scored = [], []
    fit_with, score = compress_module._compress_with, compress_module.heldout_loss

    def record_fit(model, config, data, *rest):
        fitted.append({tuple(s.reshape(-1).tolist()) for s in data})
        return fit_with(model, config, data, *rest)

    def record_score(model, sequences):
        scored.append({tuple(s.reshape(-1).tolist()) for s in sequences})
        return score(model, sequences)

    monkeypatch.setattr(compress_module, "_compress_with", record_fit)
    monkeypatch.setattr(compress_module, "heldout_loss", record_score)
    report = compress_model(build(family), WeLoreConfig(0.3, min_ratio=0.0), calibration)
    everything = {tuple(row.tolist()) for row in calibration}
    candidates = len(guard_candidates())
    # The winner's refit on every sequence comes after all the scoring, so it cannot inform the choice.
    assert len(fitted) == candidates + 1 and len(scored) == candidates and fitted[-1] == everything
    for fit, heldout in zip(fitted[:candidates], scored, strict=True):
        assert not fit & heldout and fit | heldout == everything
        assert heldout == {tuple(row.tolist()) for row in calibration[-5:]}
    assert (report.guard.fit_sequences, report.guard.heldout_sequences) == (19, 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_too_small_a_set_says_so_and_uses_the_unguarded_rule(family, calibration):
    with pytest.warns(UserWarning, match="held-out guard cannot run .*too few"):
        report = compress_model(build(family), WeLoreConfig(0.3, min_ratio=0.0), calibration[:3])
    assert report.strategy == GUARD_FALLBACK == report.guard.winner and report.guard.losses == {}
    summary = report.guard.summary()
    assert "too few" in summary and "unguarded" in summary and GUARD_FALLBACK in summary
    assert report.to_dict()["guard"]["fallback"] == report.guard.fallback
