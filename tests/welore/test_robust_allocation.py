"""Issue 16: loss-based allocation against a brute-force oracle, the shrinkage and damping math, output
sensitivities, the report's calibration energy, and every strategy on non-LLaMA models."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lowrank_train.welore import (
    GUARD_FALLBACK,
    GUARDED,
    STRATEGIES,
    AllocationStrategy,
    WeLoreConfig,
    allocate_by_loss,
    allocate_ranks,
    collect_calibration_statistics,
    collect_input_statistics,
    collect_output_sensitivity,
    compress_model,
    find_block_linears,
    generate_calibration,
    get_strategy,
    guard_candidates,
    is_low_rank_component,
    mix_generated_calibration,
    shrink_second_moment,
    truncation_losses,
    whitening_factor,
)
from lowrank_train.welore.spectrum import truncated_factors

LOSS_RULE = AllocationStrategy("test-loss", objective="loss", sensitivity=True)


def _random_problem(seed: int, shapes: dict[str, tuple[int, int]]):
    generator = torch.Generator().manual_seed(seed)
    spectra, weights = {}, {}
    for name, shape in shapes.items():
        decay = 0.3 + 1.5 * torch.rand((), generator=generator)
        r = min(shape)
        values = torch.arange(1, r + 1, dtype=torch.float64) ** -decay * (1 + 0.3 * torch.rand(r, generator=generator))
        spectra[name] = values.sort(descending=True).values
        weights[name] = float(10 ** (2 * torch.rand((), generator=generator) - 1))
    return spectra, weights


def _options(shape, min_ratio):
    # (rank, is LRC) for every choice a matrix has: each rank the LRC rule allows, or dense.
    m, n = shape
    lrc = [(k, True) for k in range(1, min(shape) + 1) if is_low_rank_component(k, shape, min_ratio)]
    return lrc + [(min(shape), False)]


def _cost_and_loss(choice, shapes, spectra, weights):
    cost = loss = 0.0
    for name, (rank, lrc) in choice.items():
        m, n = shapes[name]
        cost += rank * (m + n) if lrc else m * n
        if lrc:
            loss += weights[name] * float(spectra[name][rank:].double().square().sum())
    return cost, loss


def _brute_force(shapes, spectra, weights, min_ratio):
    names = list(shapes)
    results = []
    for combo in itertools.product(*(_options(shapes[name], min_ratio) for name in names)):
        choice = dict(zip(names, combo, strict=True))
        results.append(_cost_and_loss(choice, shapes, spectra, weights))
    return results


def _oracle(results, budget):
    return min(loss for cost, loss in results if cost <= budget + 1e-9)


PROBLEMS = [
    {"a": (12, 8), "b": (6, 10)},
    {"a": (12, 8), "b": (6, 10), "c": (9, 9)},
    {"a": (16, 4), "b": (5, 20), "c": (8, 8)},
]


@pytest.mark.parametrize("min_ratio", [0.0, 0.5])
@pytest.mark.parametrize("problem", range(len(PROBLEMS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_allocation_against_brute_force(problem, seed, min_ratio):
    shapes = PROBLEMS[problem]
    spectra, weights = _random_problem(seed, shapes)
    results = _brute_force(shapes, spectra, weights, min_ratio)
    params_before = sum(m * n for m, n in shapes.values())
    for target in (0.1, 0.2, 0.3, 0.45, 0.6):
        budget = (1 - target) * params_before
        if min(cost for cost, _ in results) > budget:
            with pytest.raises(ValueError, match="out of reach"):
                allocate_ranks(spectra, shapes, target, LOSS_RULE, min_ratio, weights)
            continue
        allocation = allocate_ranks(spectra, shapes, target, LOSS_RULE, min_ratio, weights)
        choice = {name: (allocation.ranks[name], allocation.lrc[name]) for name in shapes}
        cost, loss = _cost_and_loss(choice, shapes, spectra, weights)
        assert cost == allocation.params_after <= budget
        assert allocation.param_reduction >= target
        # No split of at most as many parameters has a smaller summed loss (exact: a Lagrangian minimiser) ...
        assert loss <= _oracle(results, cost) * (1 + 1e-9) + 1e-12
        # ... and against the best split within the whole budget, the gap is bounded by lambda * unspent budget.
        best = _oracle(results, budget)
        assert best <= loss * (1 + 1e-9) + 1e-12
        assert loss <= best + allocation.threshold * (budget - cost) + 1e-9


def test_loss_allocation_is_exact_when_the_budget_sits_on_the_frontier():
    # Budgets equal to the cost of some optimal split: the greedy must find that optimum exactly.
    shapes = PROBLEMS[1]
    spectra, weights = _random_problem(3, shapes)
    results = _brute_force(shapes, spectra, weights, 0.0)
    params_before = sum(m * n for m, n in shapes.values())
    hits = 0
    for cost, _ in sorted(set(results))[:: max(1, len(results) // 40)]:
        target = 1 - cost / params_before
        if not 0 < target < 1:
            continue
        allocation = allocate_ranks(spectra, shapes, target, LOSS_RULE, 0.0, weights)
        choice = {name: (allocation.ranks[name], allocation.lrc[name]) for name in shapes}
        _, loss = _cost_and_loss(choice, shapes, spectra, weights)
        best = _oracle(results, (1 - target) * params_before)
        hits += math.isclose(loss, best, rel_tol=1e-9, abs_tol=1e-12)
        assert loss <= best + allocation.threshold * ((1 - target) * params_before - allocation.params_after) + 1e-9
    assert hits >= 5


def test_two_matrices_split_by_weighted_loss():
    # Same spectra, one matrix 100x as sensitive: it must keep (at least) as much rank as the other.
    shapes = {"sensitive": (20, 20), "robust": (20, 20)}
    values = torch.linspace(1.0, 0.05, 20, dtype=torch.float64)
    spectra = {"sensitive": values, "robust": values.clone()}
    allocation = allocate_ranks(spectra, shapes, 0.6, LOSS_RULE, 0.0, {"sensitive": 100.0, "robust": 1.0})
    assert allocation.ranks["sensitive"] > allocation.ranks["robust"]
    results = _brute_force(shapes, spectra, {"sensitive": 100.0, "robust": 1.0}, 0.0)
    choice = {name: (allocation.ranks[name], allocation.lrc[name]) for name in shapes}
    cost, loss = _cost_and_loss(choice, shapes, spectra, {"sensitive": 100.0, "robust": 1.0})
    assert loss == pytest.approx(_oracle(results, cost))


def test_dense_is_chosen_when_halving_costs_too_much():
    # min_ratio 0.5 on a square matrix: any LRC saves parameters only below half rank; a flat spectrum makes
    # that loss huge, so the budget is taken from the matrix with a steep spectrum instead.
    shapes = {"flat": (16, 16), "steep": (16, 16)}
    spectra = {
        "flat": torch.ones(16, dtype=torch.float64),
        "steep": torch.tensor([2.0**-i for i in range(16)], dtype=torch.float64),
    }
    allocation = allocate_ranks(spectra, shapes, 0.2, LOSS_RULE, 0.5, {"flat": 1.0, "steep": 1.0})
    assert not allocation.lrc["flat"] and allocation.lrc["steep"]
    assert allocation.ranks["flat"] == 16


def test_truncation_losses_are_the_whitened_output_error():
    # E||(W - A B) x||^2 over explicit samples equals the tail energy of the whitened spectrum (no damping).
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 7, generator=generator, dtype=torch.float64)
    mixing = torch.randn(7, 7, generator=generator, dtype=torch.float64)
    samples = torch.randn(500, 7, generator=generator, dtype=torch.float64) @ mixing
    moment = samples.T @ samples / samples.shape[0]
    lower = torch.linalg.cholesky(moment)
    losses = truncation_losses(torch.linalg.svdvals(weight @ lower))
    assert losses.shape == (8,) and losses[-1] == 0
    assert losses[0] == pytest.approx(float((samples @ weight.T).square().sum(1).mean()))
    for rank in range(1, 7):
        factor_out, factor_in = truncated_factors(weight, rank, whitening=lower)
        error = samples @ (weight - factor_out @ factor_in).T
        assert losses[rank] == pytest.approx(float(error.square().sum(1).mean()), rel=1e-6)
    assert bool(torch.all(losses[:-1] >= losses[1:]))


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.1])
def test_shrinkage_and_damping_against_direct_computation(shrinkage, damping):
    generator = torch.Generator().manual_seed(2)
    samples = torch.randn(64, 6, generator=generator, dtype=torch.float64) * torch.tensor([10.0, 1, 1, 0.1, 1, 3])
    moment = samples.T @ samples / 64
    shrunk = shrink_second_moment(moment, shrinkage)
    for i in range(6):
        for j in range(6):
            expected = moment[i, j] if i == j else (1 - shrinkage) * moment[i, j]
            assert float(shrunk[i, j]) == pytest.approx(float(expected), rel=1e-12, abs=1e-15)
    factor = whitening_factor(moment, damping, shrinkage).double()
    ridge = damping * sum(float(moment[i, i]) for i in range(6)) / 6  # the diagonal is the same after shrinking
    assert torch.allclose(factor @ factor.T, shrunk + ridge * torch.eye(6, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert torch.equal(factor, factor.tril())


def test_shrinkage_validation():
    with pytest.raises(ValueError, match="shrinkage must be in"):
        shrink_second_moment(torch.eye(3), 1.5)
    with pytest.raises(ValueError, match="shrinkage must be in"):
        WeLoreConfig(0.2, "whitened", shrinkage=-0.1)
    with pytest.raises(ValueError, match="whitening strategies"):
        WeLoreConfig(0.2, "asvd", shrinkage=0.2)
    with pytest.raises(ValueError, match="weighting='whiten' only"):
        AllocationStrategy("bad", objective="loss", shrinkage=0.1)
    with pytest.raises(ValueError, match="objective"):
        AllocationStrategy("bad", objective="knapsack")
    with pytest.raises(ValueError, match="needs a score function"):
        AllocationStrategy("bad")
    with pytest.raises(ValueError, match="use objective='loss'"):
        AllocationStrategy("bad", lambda s, shape: s, sensitivity=True)


def test_allocation_argument_errors():
    shapes = PROBLEMS[0]
    spectra, weights = _random_problem(0, shapes)
    with pytest.raises(ValueError, match="pass loss_weights"):
        allocate_ranks(spectra, shapes, 0.2, LOSS_RULE, 0.0)
    with pytest.raises(ValueError, match="miss 1 matrices"):
        allocate_ranks(spectra, shapes, 0.2, LOSS_RULE, 0.0, {"a": 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        allocate_ranks(spectra, shapes, 0.2, LOSS_RULE, 0.0, {"a": 1.0, "b": -1.0})
    with pytest.raises(ValueError, match="loss_weights apply to 'loss'-objective"):
        allocate_ranks(spectra, shapes, 0.2, "welore", 0.0, weights)
    with pytest.raises(ValueError, match="losses for a rank-8 matrix"):
        allocate_by_loss({"a": torch.zeros(3), "b": torch.zeros(7)}, shapes, 100.0)


def test_default_strategy_is_the_robust_one():
    # The default is the held-out guard (tests/welore/test_guard.py); whitened-loss is its fallback and a candidate.
    assert WeLoreConfig(0.2).strategy == GUARDED and GUARD_FALLBACK == "whitened-loss"
    assert "whitened-loss" in guard_candidates()
    rule = get_strategy("whitened-loss")
    assert rule.objective == "loss" and rule.sensitivity and rule.weighting == "whiten" and rule.shrinkage == 0.1
    assert rule.generated_fraction == pytest.approx(1 / 3)
    assert rule.needs_calibration and "whitened-loss" in STRATEGIES


def _direct_sensitivity(model, name, sequences):
    # dL/dy for one layer by adding a zero tensor that requires grad to its output.
    layer = model.get_submodule(name)
    total, count = 0.0, 0
    for seq in sequences:
        holder = {}

        def hook(_module, _args, output, holder=holder):
            holder["delta"] = torch.zeros_like(output, requires_grad=True)
            return output + holder["delta"]

        handle = layer.register_forward_hook(hook)
        try:
            logits = model(seq).logits
            loss = F.cross_entropy(logits[0, :-1], seq[0, 1:], reduction="sum")
            (grad,) = torch.autograd.grad(loss, holder["delta"])
        finally:
            handle.remove()
        total += float(grad.double().square().sum())
        count += seq.shape[1]
    return total / (count * layer.out_features)


def test_output_sensitivity_matches_direct_gradients(llama, calibration):
    linears = find_block_linears(llama)
    sequences = list(calibration[:4, None])
    flags = {name: p.requires_grad for name, p in llama.named_parameters()}
    sensitivity = collect_output_sensitivity(llama, linears, sequences)
    assert set(sensitivity) == set(linears)
    assert all(p.grad is None for p in llama.parameters())
    assert flags == {name: p.requires_grad for name, p in llama.named_parameters()}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        assert sensitivity[name] == pytest.approx(_direct_sensitivity(llama, name, sequences), rel=1e-4)
    # A frozen model still has a graph to differentiate.
    for param in llama.parameters():
        param.requires_grad_(False)
    frozen = collect_output_sensitivity(llama, linears, sequences)
    assert frozen == pytest.approx(sensitivity, rel=1e-6)


def test_whitened_loss_compresses_and_reports_calibration_energy(llama, calibration):
    linears = find_block_linears(llama)
    # The calibration set compress_model measures: the user's tokens plus the model's own samples.
    sequences = mix_generated_calibration(llama, list(calibration[:, None]), 1 / 3)
    stats = collect_input_statistics(llama, linears, sequences)
    dense = copy.deepcopy(llama)
    report = compress_model(llama, WeLoreConfig(0.3, "whitened-loss", min_ratio=0.0), calibration)
    assert report.strategy == "whitened-loss" and report.param_reduction >= 0.3 and report.num_lrc > 0
    for entry in report.matrices:
        if not entry.lrc:
            assert entry.calibration_energy == 1.0
            continue
        weight = dense.get_submodule(entry.name).weight.detach().double()
        error = weight - llama.get_submodule(entry.name).merged_weight().double()
        moment = stats[entry.name].second_moment
        expected = 1 - torch.trace(error @ moment @ error.T) / torch.trace(weight @ moment @ weight.T)
        assert entry.calibration_energy == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
        assert 0.0 <= entry.calibration_energy < 1.0
    assert report.to_dict()["matrices"][0]["calibration_energy"] is not None
    free = compress_model(copy.deepcopy(dense), WeLoreConfig(0.3, "welore", min_ratio=0.0))
    assert all(entry.calibration_energy is None for entry in free.matrices)


def test_precomputed_statistics_need_sensitivities(llama, calibration):
    linears = find_block_linears(llama)
    sequences = list(calibration[:, None])
    plain = collect_input_statistics(llama, linears, sequences)
    with pytest.raises(ValueError, match="collect_calibration_statistics"):
        compress_model(copy.deepcopy(llama), WeLoreConfig(0.3, "whitened-loss", min_ratio=0.0), plain)
    # The token path mixes in the model's own samples; precomputed statistics are taken as given.
    full = collect_calibration_statistics(llama, linears, mix_generated_calibration(llama, sequences, 1 / 3))
    from_stats, from_tokens = copy.deepcopy(llama), copy.deepcopy(llama)
    report_stats = compress_model(from_stats, WeLoreConfig(0.3, "whitened-loss", min_ratio=0.0), full)
    report_tokens = compress_model(from_tokens, WeLoreConfig(0.3, "whitened-loss", min_ratio=0.0), calibration)
    assert [m.rank for m in report_stats.matrices] == [m.rank for m in report_tokens.matrices]
    with torch.no_grad():
        assert torch.allclose(from_stats(calibration[:2]).logits, from_tokens(calibration[:2]).logits, atol=1e-5)


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(config).eval()


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=128,
        hidden_size=48,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=48,
    )
    return OPTForCausalLM(config).eval()


@pytest.mark.parametrize(
    "build, layer_names",
    [(_gpt_neox, {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}), (_opt, {"out_proj", "fc1", "fc2"})],
    ids=["gpt-neox", "opt"],
)
@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - {"welore-table"}))
def test_every_strategy_on_non_llama_models(build, layer_names, strategy, calibration):
    torch.set_num_threads(1)
    model = build()
    linears = find_block_linears(model)
    assert layer_names <= {name.rsplit(".", 1)[-1] for name in linears}
    with torch.no_grad():
        reference = model(calibration[:2]).logits
    report = compress_model(model, WeLoreConfig(0.3, strategy, min_ratio=0.0), calibration)
    assert report.param_reduction >= 0.3 and report.num_lrc > 0
    with torch.no_grad():
        logits = model(calibration[:2]).logits
    assert torch.isfinite(logits).all() and logits.shape == reference.shape
    if get_strategy(strategy).needs_calibration:
        assert all(0.0 <= entry.calibration_energy <= 1.0 for entry in report.matrices)


def test_generated_calibration_mix_sizes_and_reproducibility(llama, calibration):
    sequences = list(calibration[:, None])  # 24 x 32 tokens
    state = torch.random.get_rng_state()
    mixed = mix_generated_calibration(llama, sequences, 1 / 3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    generated = mixed[len(sequences) :]
    assert mixed[: len(sequences)] == sequences
    assert len(generated) == 12 and all(seq.shape == (1, 32) for seq in generated)  # 384 / (768 + 384) = 1/3
    assert all(int(seq.min()) >= 0 and int(seq.max()) < 128 for seq in generated)
    assert all(int(seq[0, 0]) == llama.generation_config.bos_token_id for seq in generated)
    again = mix_generated_calibration(llama, sequences, 1 / 3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(mixed, again, strict=True))
    other = mix_generated_calibration(llama, sequences, 1 / 3, seed=6)
    assert not all(torch.equal(a, b) for a, b in zip(mixed, other, strict=True))
    assert mix_generated_calibration(llama, sequences, 0.0) == sequences
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        mix_generated_calibration(llama, sequences, 1.0)


class _Bigram(torch.nn.Module):
    """A causal LM without ``generate`` whose next-token distribution depends on the last token only."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Embedding.from_pretrained(logits, freeze=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


@pytest.mark.parametrize("use_generate", [False, True], ids=["plain-loop", "hf-generate"])
def test_generated_tokens_follow_the_model_distribution(use_generate):
    # Temperature 1, no top-k / top-p: the frequencies of the sampled second tokens match softmax(logits[start]).
    generator = torch.Generator().manual_seed(0)
    if use_generate:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=3,
            eos_token_id=7,
        )
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            expected = torch.softmax(model(torch.tensor([[3]])).logits[0, -1].float(), -1)
    else:
        model = _Bigram(torch.randn(8, 8, generator=generator) * 2)
        expected = torch.softmax(model.table.weight[3], -1)
    count = 4000
    samples = generate_calibration(model, count, 2, torch.full((count,), 3), seed=1)
    second = torch.stack([seq[0, 1] for seq in samples])
    observed = torch.bincount(second, minlength=8).double() / count
    # Four standard deviations of a binomial frequency, per token.
    tolerance = 4 * torch.sqrt(expected.double() * (1 - expected.double()) / count) + 1e-3
    assert bool(torch.all((observed - expected.double()).abs() <= tolerance)), (observed, expected)


def test_plain_loop_starts_from_user_tokens_without_bos():
    model = _Bigram(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    sequences = [torch.tensor([[5, 1, 2, 3]]), torch.tensor([[6, 0, 0, 1]])]
    mixed = mix_generated_calibration(model, sequences, 0.5)
    generated = mixed[2:]
    assert len(generated) == 2 and all(seq.shape == (1, 4) for seq in generated)
    assert [int(seq[0, 0]) for seq in generated] == [5, 6]
