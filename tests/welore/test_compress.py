"""compress_model, the spectra cache, failure atomicity and mark_trainable on a tiny random LLaMA."""

import copy

import pytest
import torch
from torch import nn

import lowrank_train.welore.compress as compress_module
import lowrank_train.welore.spectrum as spectrum_module
from lowrank_train.nn.lowrank_linear import LowRankLinear
from lowrank_train.welore import (
    AllocationStrategy,
    WeLoreConfig,
    collect_input_statistics,
    compress_model,
    find_block_linears,
    lowrank_layers,
    mark_trainable,
    register_strategy,
)
from lowrank_train.welore.allocation import STRATEGIES, uniform_scores

BLOCK_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    assert not lowrank_layers(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_finds_block_linears_by_type(llama):
    linears = find_block_linears(llama)
    assert len(linears) == 2 * len(BLOCK_SUFFIXES)
    assert all(name.startswith("model.layers.") for name in linears)
    assert "lm_head" not in linears


def test_model_without_block_linears():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(ValueError, match="no nn.Linear inside the model's blocks"):
        compress_model(model, WeLoreConfig(target=0.2))


@pytest.mark.parametrize("strategy", ["welore", "uniform", "whitened", "asvd"])
def test_compress_reaches_target_and_report_is_honest(llama, calibration, strategy):
    config = WeLoreConfig(target=0.3, strategy=strategy, min_ratio=0.0)
    linears = find_block_linears(llama)
    params_before = sum(lin.weight.numel() for lin in linears.values())
    report = compress_model(llama, config, calibration)
    assert report.param_reduction >= 0.3
    assert report.params_before == params_before
    # The report's count is the real parameter count of the block weights after the swap.
    after = 0
    for entry in report.matrices:
        module = llama.get_submodule(entry.name)
        assert isinstance(module, LowRankLinear) == entry.lrc
        if entry.lrc:
            assert module.rank == entry.rank
            after += module.factor_out.numel() + module.factor_in.numel()
        else:
            after += module.weight.numel()
    assert after == report.params_after
    assert report.to_dict()["totals"]["param_reduction"] == pytest.approx(report.param_reduction)
    assert strategy in report.summary()
    logits = llama(calibration[:2]).logits
    assert torch.isfinite(logits).all()


def test_min_ratio_split_in_model(llama):
    report = compress_model(llama, WeLoreConfig(target=0.2, strategy="welore", min_ratio=0.5))
    for entry in report.matrices:
        m, n = entry.shape
        lrc = 1 - entry.proposed_rank / entry.full_rank >= 0.5 and entry.proposed_rank * (m + n) < m * n
        assert entry.lrc == lrc


def test_activation_weighted_truncation_beats_plain_on_calibration(llama, calibration):
    # Same ranks for both ("uniform" scores ignore the spectrum), only the truncation differs.
    if "uniform-whitened" not in STRATEGIES:
        register_strategy(AllocationStrategy("uniform-whitened", uniform_scores, weighting="whiten"))
    plain_model, weighted_model = copy.deepcopy(llama), copy.deepcopy(llama)
    plain = compress_model(plain_model, WeLoreConfig(0.4, "uniform", min_ratio=0.0))
    weighted = compress_model(weighted_model, WeLoreConfig(0.4, "uniform-whitened", min_ratio=0.0), calibration)
    assert [m.rank for m in plain.matrices] == [m.rank for m in weighted.matrices]

    # Per layer, on the calibration inputs of the dense model: E||(W - A B) x||^2 = tr(D M D^T).
    dense = find_block_linears(llama)
    stats = collect_input_statistics(llama, dense, list(calibration[:, None]))
    for name, linear in dense.items():
        moment = stats[name].second_moment.float()
        errors = []
        for model in (plain_model, weighted_model):
            delta = linear.weight - model.get_submodule(name).merged_weight()
            errors.append(torch.trace(delta @ moment @ delta.T))
        assert errors[1] < errors[0], name

    with torch.no_grad():
        reference = llama(calibration).logits
        plain_error = (plain_model(calibration).logits - reference).norm()
        weighted_error = (weighted_model(calibration).logits - reference).norm()
    assert weighted_error < plain_error


def test_calibration_errors_leave_model_untouched(llama):
    before = _state(llama)
    config = WeLoreConfig(target=0.2, strategy="whitened")
    with pytest.raises(ValueError, match="needs a calibration set"):
        compress_model(llama, config)
    with pytest.raises(ValueError, match="calibration set is empty"):
        compress_model(llama, config, torch.empty(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="calibration set is empty"):
        compress_model(llama, config, [])
    with pytest.raises(ValueError, match="vocabulary has 128 entries"):
        compress_model(llama, config, torch.randint(0, 50_000, (4, 16)) + 200)
    with pytest.raises(ValueError, match="integer tensor of token ids"):
        compress_model(llama, config, [torch.randn(16)])
    _assert_unchanged(llama, before)


def test_failure_halfway_leaves_model_untouched(llama, monkeypatch):
    before = _state(llama)
    calls = {"n": 0}
    original = compress_module.truncated_factors  # compress_model's factorization (staged, swapped in at the end)

    def flaky(weight, rank, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated SVD failure")
        return original(weight, rank, **kwargs)

    monkeypatch.setattr(compress_module, "truncated_factors", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        compress_model(llama, WeLoreConfig(target=0.3, strategy="welore", min_ratio=0.0))
    assert calls["n"] == 3
    _assert_unchanged(llama, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": 0.0}, r"target must be a fraction of parameters to remove in \(0, 1\)"),
        ({"target": 1.0}, r"in \(0, 1\)"),
        ({"target": 0.2, "strategy": "magic"}, "unknown strategy"),
        ({"target": 0.2, "min_ratio": 1.0}, "min_ratio"),
        ({"target": 0.2, "num_threads": 0}, "num_threads"),
        ({"target": 0.2, "damping": -1.0}, "damping"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeLoreConfig(**kwargs)


def test_spectra_cache_skips_svd_and_rejects_other_models(llama, calibration, tmp_path, monkeypatch):
    cache = str(tmp_path / "spectra.safetensors")
    first, second = copy.deepcopy(llama), copy.deepcopy(llama)
    report_1 = compress_model(first, WeLoreConfig(0.3, "whitened", cache_path=cache), calibration)
    compress_model(copy.deepcopy(llama), WeLoreConfig(0.3, "welore", cache_path=cache))  # a second kind

    def no_spectra(*args, **kwargs):
        raise AssertionError("spectra should come from the cache")

    monkeypatch.setattr(compress_module, "compute_spectra", no_spectra)
    report_2 = compress_model(second, WeLoreConfig(0.3, "whitened", cache_path=cache), calibration)
    assert [m.rank for m in report_1.matrices] == [m.rank for m in report_2.matrices]
    compress_model(copy.deepcopy(llama), WeLoreConfig(0.3, "welore", cache_path=cache))

    other = copy.deepcopy(llama)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    before = _state(other)
    with pytest.raises(ValueError, match="different model"):
        compress_model(other, WeLoreConfig(0.3, "welore", cache_path=cache))
    _assert_unchanged(other, before)


def test_thread_count_is_restored(llama):
    torch.set_num_threads(2)
    try:
        compress_model(llama, WeLoreConfig(target=0.2, strategy="welore", num_threads=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError, match="num_threads"):
        with spectrum_module.limit_threads(0):
            pass


def _trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _make_low_rank(model, names, rank=3):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            m, n = weight.shape
            low = torch.randn(m, rank, generator=generator) @ torch.randn(rank, n, generator=generator) / n
            weight.copy_(low + 1e-3 * torch.randn(m, n, generator=generator))


LOW_RANK = ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj")


def test_welore_factorizes_low_rank_matrices_first(llama):
    # The paper's premise: heavy-tailed (low-rank) spectra are compressed hard, the rest stay dense.
    _make_low_rank(llama, LOW_RANK)
    report = compress_model(llama, WeLoreConfig(target=0.1, strategy="welore", min_ratio=0.5))
    assert {m.name for m in report.matrices if m.lrc} == set(LOW_RANK)


def test_mark_trainable_modes(llama):
    _make_low_rank(llama, LOW_RANK)
    report = compress_model(llama, WeLoreConfig(target=0.1, strategy="welore", min_ratio=0.5))
    lrc_names = {m.name for m in report.matrices if m.lrc}
    dense_names = {m.name for m in report.matrices if not m.lrc}
    assert lrc_names == set(LOW_RANK) and dense_names
    lrc_params = {f"{n}.{p}" for n in lrc_names for p in ("factor_out", "factor_in")}
    dense_params = {f"{n}.weight" for n in dense_names}

    groups = mark_trainable(llama, "lrc")
    assert _trainable(llama) == lrc_params
    assert len(groups) == 1 and set(groups[0]["param_names"]) == lrc_params

    groups = mark_trainable(llama, "all")
    assert _trainable(llama) == lrc_params | dense_params
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in llama.parameters() if p.requires_grad
    )

    groups = mark_trainable(llama, "lrc+galore", galore_rank=8, galore_options={"update_gap": 50})
    assert _trainable(llama) == lrc_params | dense_params
    plain, galore = groups
    assert "rank" not in plain and set(plain["param_names"]) == lrc_params
    assert galore["rank"] == 8 and galore["update_gap"] == 50
    assert set(galore["param_names"]) == dense_params and all(p.dim() == 2 for p in galore["params"])
    # Embeddings (tied with the head) and norms stay frozen in every mode.
    assert not llama.model.embed_tokens.weight.requires_grad
    assert not llama.model.norm.weight.requires_grad

    with pytest.raises(ValueError, match="unknown mode"):
        mark_trainable(llama, "everything")


def test_mark_trainable_lrc_needs_compression(llama):
    with pytest.raises(ValueError, match="no LowRankLinear"):
        mark_trainable(llama, "lrc")


def test_lrc_groups_train_only_the_factors(llama, calibration):
    _make_low_rank(llama, LOW_RANK)
    compress_model(llama, WeLoreConfig(target=0.1, strategy="welore", min_ratio=0.5))
    optimizer = torch.optim.AdamW(mark_trainable(llama, "lrc"), lr=1e-3)
    before = _state(llama)
    llama.train()
    llama(calibration[:2], labels=calibration[:2]).loss.backward()
    optimizer.step()
    changed = {k for k, v in llama.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.{p}" for n in LOW_RANK for p in ("factor_out", "factor_in")}


def test_precomputed_statistics_match_token_calibration(llama, calibration):
    stats = collect_input_statistics(llama, find_block_linears(llama), list(calibration[:, None]))
    from_tokens, from_stats = copy.deepcopy(llama), copy.deepcopy(llama)
    config = WeLoreConfig(target=0.3, strategy="whitened", min_ratio=0.0)
    report_tokens = compress_model(from_tokens, config, calibration)
    report_stats = compress_model(from_stats, config, stats)
    assert [m.rank for m in report_tokens.matrices] == [m.rank for m in report_stats.matrices]
    with torch.no_grad():
        assert torch.allclose(from_tokens(calibration[:2]).logits, from_stats(calibration[:2]).logits, atol=1e-5)
    partial = dict(list(stats.items())[:3])
    with pytest.raises(ValueError, match="miss"):
        compress_model(copy.deepcopy(llama), config, partial)


def test_lrc_plus_galore_groups_feed_galore(llama, calibration):
    from lowrank_train import optim

    _make_low_rank(llama, LOW_RANK)
    compress_model(llama, WeLoreConfig(target=0.1, strategy="welore", min_ratio=0.5))
    groups = mark_trainable(llama, "lrc+galore", galore_rank=8, galore_options={"update_gap": 10})
    optimizer = optim.GaLore(groups, base="adamw", lr=1e-3)
    before = _state(llama)
    llama.train()
    llama(calibration[:2], labels=calibration[:2]).loss.backward()
    optimizer.step()
    changed = {k for k, v in llama.state_dict().items() if not torch.equal(v, before[k])}
    assert set(groups[1]["param_names"]) <= changed  # the N-LRC weights moved through GaLore
    assert all(optimizer.is_lowrank(p) for p in groups[1]["params"])
    assert not any("embed_tokens" in k or "norm" in k for k in changed)
