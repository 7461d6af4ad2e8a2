"""compress_model refuses, before any work and naming the matrix, what used to fail deep inside (issue 20)."""

import copy

import pytest
import torch

from lowrank_train.welore import WeLoreConfig, collect_input_statistics, compress_model, find_block_linears
from lowrank_train.welore.compress import MIN_CALIBRATION_TOKENS


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    same = [torch.allclose(after[k], before[k], rtol=0, atol=0, equal_nan=True) for k in before]
    return after.keys() == before.keys() and all(same)


@pytest.mark.parametrize("strategy", ["welore", "whitened", "whitened-loss"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weight_is_named_up_front(llama, calibration, strategy, value):
    # Before: linalg.eigh "failed to converge", "not positive definite" or "probability tensor contains nan".
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[3, 4] = value
    before = _state(llama)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds NaN/Inf"):
        compress_model(llama, WeLoreConfig(target=0.3, strategy=strategy), calibration)
    assert _unchanged(llama, before)


def test_nonfinite_weights_elsewhere_are_counted(llama):
    with torch.no_grad():
        for layer in llama.model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
                linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"q_proj\.weight, .* and 2 more hold NaN/Inf"):
        compress_model(llama, WeLoreConfig(target=0.3, strategy="welore"))


def test_compressing_a_compressed_model_says_so(llama, calibration):
    compressed = copy.deepcopy(llama)
    compress_model(compressed, WeLoreConfig(target=0.3, strategy="welore", min_ratio=0.0))
    # Before: "found no nn.Linear inside the model's blocks", or the N-LRCs alone re-split at the new target.
    for strategy in ("welore", "whitened"):
        with pytest.raises(ValueError, match=r"already compressed: it holds \d+ LowRankLinear layers"):
            compress_model(compressed, WeLoreConfig(target=0.5, strategy=strategy), calibration)


@pytest.mark.parametrize("strategy", ["whitened", "asvd", "whitened-loss"])
def test_calibration_needs_a_minimum_of_tokens(llama, strategy):
    before = _state(llama)
    for tokens in (torch.tensor([[5]]), torch.randint(0, 128, (2, 8))):  # before: 1 token compressed silently
        with pytest.raises(ValueError, match=rf"{strategy}.*at least {MIN_CALIBRATION_TOKENS} calibration tokens"):
            compress_model(llama, WeLoreConfig(target=0.3, strategy=strategy), tokens)
    assert _unchanged(llama, before)


def test_precomputed_statistics_need_the_minimum_too(llama):
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_input_statistics(llama, find_block_linears(llama), [tokens])
    with pytest.raises(ValueError, match=rf"at least {MIN_CALIBRATION_TOKENS} calibration tokens, got 16"):
        compress_model(llama, WeLoreConfig(target=0.3, strategy="whitened"), stats)


def test_enough_calibration_still_compresses(llama):
    tokens = torch.randint(0, 128, (2, MIN_CALIBRATION_TOKENS // 2), generator=torch.Generator().manual_seed(0))
    report = compress_model(llama, WeLoreConfig(target=0.3, strategy="whitened", min_ratio=0.0), tokens)
    assert report.num_lrc > 0
