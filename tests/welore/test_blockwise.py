"""Block-by-block compress_model against the whole-model implementation it replaced (issue 14 item 2).

The reference below is the earlier compress_model written out with the library's public pieces: whole-model
calibration statistics, LAPACK SVDs (``torch.linalg.svdvals`` and ``_svd_factors``), the formula-level
whitening, one allocation, every replacement built before any swap.
"""

import copy
import gc
import warnings

import pytest
import torch
from torch import nn

import lowrank_train.welore.blockwise as blockwise_module
import lowrank_train.welore.compress as compress_module
from lowrank_train.nn.lowrank_linear import LowRankLinear
from lowrank_train.nn.surgery import replace_module
from lowrank_train.welore import (
    STRATEGIES,
    WeLoreConfig,
    allocate_ranks,
    collect_input_statistics,
    collect_output_sensitivity,
    compress_model,
    find_block_linears,
    get_strategy,
    lowrank_layers,
    mix_generated_calibration,
)
from lowrank_train.welore.blockwise import CalibrationChain, FactorStaging, chain_mismatch, plan_blocks
from lowrank_train.welore.compress import asvd_scale
from lowrank_train.welore.spectrum import (
    shrink_second_moment,
    singular_values,
    truncated_factors,
    weighted_matrix,
    whitening_factor,
)

BUILTIN_STRATEGIES = tuple(sorted(STRATEGIES))  # at import: the registered built-ins only


def _svd_factors(weight, rank, input_scale=None, whitening=None):
    # The LAPACK oracle: with M = W R = U S V^T, A = U_k S_k^1/2 and B = S_k^1/2 V_k^T R^-1.
    u, s, vh = torch.linalg.svd(weighted_matrix(weight, input_scale, whitening), full_matrices=False)
    root = s[:rank].sqrt()
    factor_in = root[:, None] * vh[:rank]
    if input_scale is not None:
        factor_in = factor_in / input_scale.to(factor_in.dtype)
    elif whitening is not None:
        factor_in = torch.linalg.solve_triangular(whitening.to(factor_in.dtype).T, factor_in.T, upper=True).T
    return u[:, :rank] * root, factor_in


def _formula_whitening(second_moment, damping, shrinkage):
    # The whitening as first written: symmetrize, shrink, add damping * 10^a * I until Cholesky succeeds.
    moment = second_moment.double()
    moment = 0.5 * (moment + moment.T)
    if shrinkage > 0.0:
        moment = (1.0 - shrinkage) * moment + shrinkage * torch.diag(moment.diagonal())
    ridge = damping * moment.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(moment.shape[0], dtype=moment.dtype)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(moment + ridge * (10.0**attempt) * eye)
        if int(info) == 0:
            return factor.float()
    raise ValueError("not positive definite")


def _brute_force_statistics(model, linears, calibration):
    # Every linear's inputs captured in full, then E[x x^T] and E|x| in float64 at once.
    inputs = {name: [] for name in linears}
    handles = [
        linear.register_forward_pre_hook(lambda _m, args, name=name: inputs[name].append(args[0].detach()))
        for name, linear in linears.items()
    ]
    with torch.no_grad():
        for seq in calibration:
            model(seq.reshape(1, -1))
    for handle in handles:
        handle.remove()
    result = {}
    for name, xs in inputs.items():
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        result[name] = (flat.T @ flat / flat.shape[0], flat.abs().mean(0))
    return result


def reference_compress(model, config, calibration=None):
    """The whole-model compress_model: returns (allocation, spectra, factors, energies) and swaps the layers in."""
    strategy = get_strategy(config.strategy)
    linears = find_block_linears(model)
    shapes = {name: (lin.out_features, lin.in_features) for name, lin in linears.items()}
    weightings = {name: {} for name in linears}
    stats = loss_weights = None
    if strategy.needs_calibration:
        sequences = [seq.reshape(1, -1) for seq in calibration]
        generated = config.generated_fraction if config.generated_fraction is not None else strategy.generated_fraction
        sequences = mix_generated_calibration(model, sequences, generated, num_threads=config.num_threads)
        stats = collect_input_statistics(model, linears, sequences)
        if strategy.sensitivity:
            loss_weights = collect_output_sensitivity(model, linears, sequences)
        shrinkage = config.shrinkage if config.shrinkage is not None else strategy.shrinkage
        if strategy.weighting == "whiten":
            weightings = {
                n: {"whitening": _formula_whitening(s.second_moment, config.damping, shrinkage)}
                for n, s in stats.items()
            }
        elif strategy.weighting == "scale":
            weightings = {n: {"input_scale": asvd_scale(s.mean_abs, config.asvd_alpha)} for n, s in stats.items()}
    spectra = {n: torch.linalg.svdvals(weighted_matrix(lin.weight, **weightings[n])) for n, lin in linears.items()}
    allocation = allocate_ranks(spectra, shapes, config.target, strategy, config.min_ratio, loss_weights)
    factors = {
        name: _svd_factors(linear.weight, allocation.ranks[name], **weightings[name])
        for name, linear in linears.items()
        if allocation.lrc[name]
    }
    replacements = {
        name: LowRankLinear.from_factors(linear, *factors[name]) for name, linear in linears.items() if name in factors
    }
    energies = {}
    if stats is not None:
        energies = {
            n: compress_module._calibration_energy(linears[n], layer, stats[n]) for n, layer in replacements.items()
        }
    for name, layer in replacements.items():
        replace_module(model, name, layer)
    return allocation, spectra, factors, energies


def _align_signs(factor_out, factor_in, reference_out):
    # Singular directions are defined up to sign: flip each to agree with the reference's column.
    signs = torch.sign((factor_out * reference_out).sum(0))
    signs[signs == 0] = 1.0
    return factor_out * signs, factor_in * signs[:, None]


def _assert_matches_reference(model, report, reference, spectra_seen=None):
    allocation, spectra, factors, energies = reference
    assert [m.name for m in report.matrices] == list(allocation.ranks)
    assert {m.name: m.rank for m in report.matrices} == allocation.ranks
    assert {m.name: m.lrc for m in report.matrices} == allocation.lrc
    assert {m.name: m.proposed_rank for m in report.matrices} == allocation.proposed
    assert report.threshold == pytest.approx(allocation.threshold, rel=1e-4, abs=1e-12)
    if spectra_seen is not None:
        for name, values in spectra.items():
            torch.testing.assert_close(spectra_seen[name], values, atol=2e-6 * float(values[0]), rtol=0)
    layers = lowrank_layers(model)
    assert set(layers) == set(factors)
    for name, (reference_out, reference_in) in factors.items():
        layer = layers[name]
        product = reference_out @ reference_in
        torch.testing.assert_close(
            layer.merged_weight(), product, atol=2e-5 * float(product.abs().max()), rtol=0, msg=name
        )
        # Each direction agrees up to sign where its singular value is separated from its neighbours' (inside a
        # near-degenerate cluster any rotation is as good, and float32 LAPACK itself is only that accurate).
        factor_out, factor_in = _align_signs(layer.factor_out.detach(), layer.factor_in.detach(), reference_out)
        values = reference_out.square().sum(0)  # = s_j
        gaps = torch.full_like(values, float("inf"))
        gaps[1:] = torch.minimum(gaps[1:], values[:-1] - values[1:])
        gaps[:-1] = torch.minimum(gaps[:-1], values[:-1] - values[1:])
        separated = gaps > 0.02 * values[0]
        assert separated.any(), name
        scale_out, scale_in = float(reference_out.abs().max()), float(reference_in.abs().max())
        torch.testing.assert_close(
            factor_out[:, separated], reference_out[:, separated], atol=5e-4 * scale_out, rtol=0, msg=name
        )
        torch.testing.assert_close(
            factor_in[separated], reference_in[separated], atol=5e-4 * scale_in, rtol=0, msg=name
        )
    for entry in report.matrices:
        if entry.name in energies:
            assert entry.calibration_energy == pytest.approx(energies[entry.name], abs=1e-5)
        elif entry.calibration_energy is not None:
            assert entry.calibration_energy == 1.0  # dense


def _spy_spectra(monkeypatch):
    seen = {}
    original = compress_module.compute_spectra

    def spy(linears, weightings=None, num_threads=1):
        result = original(linears, weightings, num_threads)
        seen.update(result)
        return result

    monkeypatch.setattr(compress_module, "compute_spectra", spy)
    return seen


@pytest.mark.parametrize("min_ratio", [0.0, 0.5])
@pytest.mark.parametrize("strategy", BUILTIN_STRATEGIES)
def test_blockwise_equals_whole_model_reference(llama, calibration, strategy, min_ratio, monkeypatch):
    target = 0.3 if min_ratio == 0.0 else 0.15
    # Without the model's own samples (tested in test_robust_allocation): on this tiny model they put a rank cut
    # between two singular values 1% apart, where the factors are defined only to that accuracy.
    config = WeLoreConfig(target=target, strategy=strategy, min_ratio=min_ratio, generated_fraction=0.0)
    reference_model = copy.deepcopy(llama)
    reference = reference_compress(reference_model, config, calibration)
    if strategy != "welore-table":
        assert reference[0].param_reduction >= target
    spectra_seen = _spy_spectra(monkeypatch)
    report = compress_model(llama, config, calibration)
    _assert_matches_reference(llama, report, reference, spectra_seen)
    with torch.no_grad():
        torch.testing.assert_close(
            llama(calibration[:2]).logits, reference_model(calibration[:2]).logits, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("staging", ["memory", "disk"])
def test_staging_locations_give_the_same_model(llama, calibration, staging, tmp_path):
    config = WeLoreConfig(target=0.3, strategy="whitened", min_ratio=0.0, staging=staging, staging_dir=str(tmp_path))
    reference_model = copy.deepcopy(llama)
    reference = reference_compress(reference_model, config, calibration)
    report = compress_model(llama, config, calibration)
    _assert_matches_reference(llama, report, reference)
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone


def test_auto_staging_uses_disk_for_a_cpu_model(llama, calibration, monkeypatch, tmp_path):
    locations, files = [], []
    original_put = FactorStaging.put

    def put(self, key, tensors):
        original_put(self, key, tensors)
        locations.append(self.location)
        files.extend(p.name for p in tmp_path.rglob("*.safetensors"))

    monkeypatch.setattr(FactorStaging, "put", put)
    compress_model(llama, WeLoreConfig(0.3, "welore", min_ratio=0.0, staging_dir=str(tmp_path)), calibration)
    assert locations and set(locations) == {"disk"}
    assert files  # the factors really were on disk before the swap
    assert list(tmp_path.iterdir()) == []


def test_block_statistics_equal_whole_model_statistics(llama, calibration):
    # The chain reproduces the model's own forward: each block's statistics are those of one whole-model pass,
    # bit for bit; and both equal a brute-force oracle.
    linears = find_block_linears(llama)
    sequences = list(calibration[:, None])
    whole = collect_input_statistics(llama, linears, sequences)
    oracle = _brute_force_statistics(llama, linears, sequences)
    plan = plan_blocks(llama, linears)
    assert [len(entry.linears) for entry in plan] == [7, 7]
    assert chain_mismatch(llama, [entry.block for entry in plan], sequences[0]) is None
    chain = CalibrationChain(llama, [entry.block for entry in plan], sequences)
    for entry in plan:
        stats = chain.run(entry.block, entry.linears)
        assert set(stats) == set(entry.linears)
        for name, entry_stats in stats.items():
            assert torch.equal(entry_stats.second_moment, whole[name].second_moment), name
            assert torch.equal(entry_stats.mean_abs, whole[name].mean_abs), name
            assert entry_stats.num_tokens == whole[name].num_tokens == calibration.numel()
            moment, mean_abs = oracle[name]
            torch.testing.assert_close(entry_stats.second_moment, moment, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(entry_stats.mean_abs, mean_abs, rtol=1e-5, atol=1e-7)
        # q, k, v read one input: one shared statistics object
        prefix = entry.name + ".self_attn."
        assert stats[prefix + "q_proj"] is stats[prefix + "k_proj"] is stats[prefix + "v_proj"]


def test_finished_blocks_statistics_are_freed(llama, calibration, monkeypatch):
    # During the factor pass of a block, the float64 second moments alive are that block's only (at most its
    # 4 distinct inputs); during the spectra pass they are freed before the SVDs.
    linears = find_block_linears(llama)
    sizes = {lin.in_features for lin in linears.values()}

    def live_moments():
        gc.collect()
        return [
            obj
            for obj in gc.get_objects()
            if isinstance(obj, torch.Tensor)
            and obj.dtype == torch.float64
            and obj.dim() == 2
            and obj.shape[0] == obj.shape[1]
            and obj.shape[0] in sizes
        ]

    counts = {"spectra": [], "factors": []}
    original_spectra, original_factors = compress_module.compute_spectra, compress_module.truncated_factors

    def spectra(*args, **kwargs):
        counts["spectra"].append(len(live_moments()))
        return original_spectra(*args, **kwargs)

    def factors(*args, **kwargs):
        counts["factors"].append(len(live_moments()))
        return original_factors(*args, **kwargs)

    monkeypatch.setattr(compress_module, "compute_spectra", spectra)
    monkeypatch.setattr(compress_module, "truncated_factors", factors)
    report = compress_model(llama, WeLoreConfig(0.3, "whitened", min_ratio=0.0), calibration)
    assert counts["spectra"] == [0, 0]
    assert len(counts["factors"]) == report.num_lrc >= 8
    assert max(counts["factors"]) <= 4 and min(counts["factors"]) >= 1


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, hidden_states, scale=1.0):
        return hidden_states + scale * self.down(torch.relu(self.up(self.norm(hidden_states))))


class _ToyLM(nn.Module):
    """Blocks called by keyword, with a keyword argument; optionally an operation between blocks."""

    def __init__(self, between=None, vocab=64, width=24, depth=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab)
        self.between = between

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for index, block in enumerate(self.blocks):
            hidden = block(hidden_states=hidden, scale=0.5)
            if self.between is not None and index == 0:
                hidden = self.between(hidden)
        return self.head(hidden)


@pytest.mark.parametrize("between", [None, lambda h: 2.0 * h])
def test_custom_model_and_unchained_fallback(between):
    torch.manual_seed(3)
    model = _ToyLM(between)
    calibration = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(4))
    config = WeLoreConfig(target=0.3, strategy="whitened", min_ratio=0.0)
    reference_model = copy.deepcopy(model)
    reference = reference_compress(reference_model, config, calibration)
    plan = plan_blocks(model, find_block_linears(model))
    reason = chain_mismatch(model, [entry.block for entry in plan], calibration[:1])
    if between is None:
        assert reason is None
        report = compress_model(model, config, calibration)
    else:
        assert reason == "the input of block 1 is not block 0's output"
        with pytest.warns(UserWarning, match=r"cannot be calibrated one at a time.*GiB of float64 second moments"):
            report = compress_model(model, config, calibration)
    _assert_matches_reference(model, report, reference)


def test_failure_in_the_factor_pass_leaves_model_untouched(llama, calibration, monkeypatch, tmp_path):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    calls = {"n": 0}
    original = compress_module.truncated_factors

    def flaky(weight, rank, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second block
            raise RuntimeError("simulated factorization failure")
        return original(weight, rank, **kwargs)

    monkeypatch.setattr(compress_module, "truncated_factors", flaky)
    config = WeLoreConfig(0.3, "whitened", min_ratio=0.0, staging="disk", staging_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="simulated"):
        compress_model(llama, config, calibration)
    assert calls["n"] == 9
    assert not lowrank_layers(llama)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_damaged_staging_is_refused_before_any_swap(llama, calibration, monkeypatch, tmp_path):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    original_check = FactorStaging.check

    def damage_then_check(self):
        # Replace the last block's file with one that lacks a tensor, as a truncated write would.
        key = self.keys()[-1]
        path = self._files[key]
        tensors = blockwise_module.load_file(path)
        tensors.pop(sorted(tensors)[0])
        blockwise_module.save_file(tensors, path)
        original_check(self)

    monkeypatch.setattr(FactorStaging, "check", damage_then_check)
    config = WeLoreConfig(0.3, "welore", min_ratio=0.0, staging="disk", staging_dir=str(tmp_path))
    with pytest.raises(ValueError, match="do not match what was written"):
        compress_model(llama, config, calibration)
    assert not lowrank_layers(llama)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_failure_while_swapping_says_what_was_swapped(llama, monkeypatch):
    original_take = FactorStaging.take
    taken = []

    def take(self, key, device):
        if taken:
            raise OSError("simulated read error")
        taken.append(key)
        return original_take(self, key, device)

    monkeypatch.setattr(FactorStaging, "take", take)
    with pytest.raises(OSError, match="simulated") as error:
        compress_model(llama, WeLoreConfig(0.3, "welore", min_ratio=0.0))
    assert any("are already low-rank" in note for note in error.value.__notes__)
    assert set(lowrank_layers(llama)) and all(name.startswith(taken[0]) for name in lowrank_layers(llama))


def test_config_rejects_unknown_staging():
    with pytest.raises(ValueError, match="staging must be one of"):
        WeLoreConfig(target=0.2, staging="tape")


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_in_place_whitening_equals_the_formula(shrinkage, damping):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(40, 24, generator=generator, dtype=torch.float64)
    moments = [x.T @ x / 40, (x[:10].T @ x[:10]) / 10]  # full rank, and rank 10 (needs the ridge retries)
    for moment in moments:
        moment = moment + 1e-9 * torch.randn(24, 24, generator=generator, dtype=torch.float64)  # not symmetric
        original = moment.clone()
        try:
            expected = _formula_whitening(moment, damping, shrinkage)
        except ValueError:
            with pytest.raises(ValueError, match="not positive definite"):
                whitening_factor(moment, damping, shrinkage)
            continue
        assert torch.equal(whitening_factor(moment, damping, shrinkage), expected)
        assert torch.equal(moment, original)  # the caller's statistics are never modified
        symmetric = 0.5 * (moment + moment.T)
        formula = (1 - shrinkage) * symmetric + shrinkage * torch.diag(symmetric.diagonal())
        assert torch.equal(shrink_second_moment(moment, shrinkage), symmetric if shrinkage == 0 else formula)


def _matrices():
    generator = torch.Generator().manual_seed(11)
    low = torch.randn(30, 3, generator=generator) @ torch.randn(3, 50, generator=generator)
    return {
        "wide": torch.randn(30, 50, generator=generator),
        "tall": torch.randn(50, 30, generator=generator),
        "square": torch.randn(40, 40, generator=generator),
        "rank-3": low,  # exact zero singular values beyond 3
        "rank-3-tall": low.T.contiguous(),
        "float64": torch.randn(20, 35, generator=generator, dtype=torch.float64),
        "bfloat16": torch.randn(24, 40, generator=generator).to(torch.bfloat16),
    }


@pytest.mark.parametrize("weighting", ["none", "whitening", "input_scale"])
@pytest.mark.parametrize("kind", list(_matrices()))
def test_gram_factorization_matches_lapack(kind, weighting):
    weight = _matrices()[kind]
    generator = torch.Generator().manual_seed(12)
    n = weight.shape[1]
    x = torch.randn(4 * n, n, generator=generator, dtype=torch.float64) * torch.linspace(
        0.2, 3.0, n, dtype=torch.float64
    )
    extra = {}
    if weighting == "whitening":
        extra = {"whitening": whitening_factor(x.T @ x / x.shape[0])}
    elif weighting == "input_scale":
        extra = {"input_scale": torch.rand(n, generator=generator) + 0.5}
    matrix = weighted_matrix(weight, **extra)
    reference = torch.linalg.svdvals(matrix)
    values = singular_values(matrix)
    assert values.dtype == matrix.dtype and values.shape == reference.shape
    torch.testing.assert_close(values, reference, atol=1e-6 * float(reference[0]), rtol=0)
    for rank in (1, 3, min(weight.shape) // 2, min(weight.shape)):
        factor_out, factor_in = truncated_factors(weight, rank, **extra)
        reference_out, reference_in = _svd_factors(weight, rank, **extra)
        assert factor_out.shape == reference_out.shape and factor_in.shape == reference_in.shape
        assert factor_out.dtype == reference_out.dtype and factor_in.dtype == reference_in.dtype
        assert torch.isfinite(factor_out).all() and torch.isfinite(factor_in).all()
        product, expected = factor_out @ factor_in, reference_out @ reference_in
        torch.testing.assert_close(product, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
        if rank <= 3:  # well separated directions: the factors themselves agree up to sign
            factor_out, factor_in = _align_signs(factor_out, factor_in, reference_out)
            torch.testing.assert_close(factor_out, reference_out, atol=1e-4 * float(reference_out.abs().max()), rtol=0)
            torch.testing.assert_close(factor_in, reference_in, atol=1e-4 * float(reference_in.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="rank must be in"):
        truncated_factors(weight, min(weight.shape) + 1)


LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _per_layer_model(family):
    # 4 layers alternating sliding-window and full attention; the window (8) is shorter than the sequences (32).
    import transformers

    torch.set_num_threads(1)
    torch.manual_seed(5)
    sizes = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=8,
        layer_types=LAYER_TYPES,
    )
    config_class, model_class, extra = {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 0}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
        "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {}),
    }[family]
    config = getattr(transformers, config_class)(**sizes, **extra)
    assert list(config.layer_types) == LAYER_TYPES
    return getattr(transformers, model_class)(config).eval()


PER_LAYER_FAMILIES = ["qwen2", "gemma2", "gemma3", "cohere2"]


@pytest.mark.parametrize("family", PER_LAYER_FAMILIES)
def test_blocks_with_their_own_masks_are_chained(family, calibration):
    # Each block gets its own mask and rotary table: the chain's statistics equal the whole-model pass's bit for
    # bit, and equal tensors are kept once (per attention type, over all sequences).
    model = _per_layer_model(family)
    linears = find_block_linears(model)
    sequences = list(calibration[:4, None])
    plan = plan_blocks(model, linears)
    blocks = [entry.block for entry in plan]
    with torch.no_grad():
        assert chain_mismatch(model, blocks, sequences[0]) is None
        whole = collect_input_statistics(model, linears, sequences)
        chain = CalibrationChain(model, blocks, sequences)
        masks = [[calls[i].kwargs["attention_mask"] for i in range(4)] for calls in chain._calls]
        sliding, full = masks[0][0], masks[0][1]  # sdpa's full causal mask may be None (is_causal)
        assert sliding is not None and (full is None or not torch.equal(sliding, full))  # the window matters
        assert all(row[0] is masks[0][0] and row[2] is masks[0][0] for row in masks)
        assert all(row[1] is masks[0][1] and row[3] is masks[0][1] for row in masks)
        with pytest.raises(ValueError, match="next block is block 0"):
            chain.run(blocks[1])
        for entry in plan:
            for name, stats in chain.run(entry.block, entry.linears).items():
                assert torch.equal(stats.second_moment, whole[name].second_moment), name
                assert torch.equal(stats.mean_abs, whole[name].mean_abs), name


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_per_layer_attention_compresses_block_by_block(family, calibration):
    model = _per_layer_model(family)
    config = WeLoreConfig(target=0.3, strategy="whitened", min_ratio=0.0, generated_fraction=0.0)
    reference_model = copy.deepcopy(model)
    reference = reference_compress(reference_model, config, calibration)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot be calibrated one at a time.*")
        report = compress_model(model, config, calibration)
    _assert_matches_reference(model, report, reference)
    with torch.no_grad():
        torch.testing.assert_close(
            model(calibration[:2]).logits, reference_model(calibration[:2]).logits, atol=1e-4, rtol=0
        )
