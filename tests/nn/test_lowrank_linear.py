"""LowRankLinear: reconstruction at full rank, exact merge, dtypes, autocast (the factorization: tests/welore)."""

import pytest
import torch
from torch import nn

from lowrank_train.nn.lowrank_linear import LowRankLinear
from lowrank_train.welore.spectrum import truncated_factors

torch.set_num_threads(1)

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}


def _inputs(in_features: int, generator: torch.Generator) -> torch.Tensor:
    # Anisotropic inputs (a few loud channels), like real LLM activations.
    scale = torch.logspace(0, 1.5, in_features)[torch.randperm(in_features, generator=generator)]
    return torch.randn(256, in_features, generator=generator) * scale


def _weighting(kind: str, x: torch.Tensor) -> dict:
    if kind == "plain":
        return {}
    if kind == "scale":
        return {"input_scale": x.abs().mean(0).sqrt()}
    moment = x.T.double() @ x.double() / x.shape[0]
    return {"whitening": torch.linalg.cholesky(moment).float()}


def _factorized(linear: nn.Linear, rank: int, **weighting) -> LowRankLinear:
    return LowRankLinear.from_factors(linear, *truncated_factors(linear.weight, rank, **weighting))


@pytest.mark.parametrize("kind", ["plain", "scale", "whiten"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (12, 12)])
def test_full_rank_reconstructs_weight(kind, shape):
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    extra = _weighting(kind, _inputs(shape[1], generator))
    layer = _factorized(linear, min(shape), **extra)
    assert torch.allclose(layer.merged_weight(), linear.weight, atol=1e-4)
    assert torch.equal(layer.bias, linear.bias)
    x = torch.randn(5, shape[1], generator=generator)
    assert torch.allclose(layer(x), linear(x), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_from_factors_keeps_dtype_device_bias(dtype, bias):
    linear = nn.Linear(20, 12, bias=bias, dtype=dtype)
    layer = _factorized(linear, 12)
    assert layer.factor_out.dtype == layer.factor_in.dtype == dtype
    assert layer.factor_out.shape == (12, 12) and layer.factor_in.shape == (12, 20)
    assert layer.factor_out.device == linear.weight.device
    assert (layer.bias is None) == (not bias)
    error = (layer.merged_weight().double() - linear.weight.double()).abs().max()
    assert error <= TOLERANCE[dtype] * linear.weight.double().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_is_exact_and_idempotent(dtype):
    torch.manual_seed(1)
    layer = _factorized(nn.Linear(16, 24, dtype=dtype), 5)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == dtype
    expected = (layer.factor_out.float() @ layer.factor_in.float()).to(dtype)
    assert torch.equal(merged.weight, expected)
    assert torch.equal(merged.bias, layer.bias)
    x = torch.randn(3, 16, dtype=dtype)
    assert torch.allclose(merged(x).float(), layer(x).float(), atol=TOLERANCE[dtype] * 10)
    # Re-factorizing the merged (rank-5) weight at rank 5 gives it back: merge is a fixed point.
    again = _factorized(merged, 5).merge()
    assert torch.allclose(again.weight.float(), merged.weight.float(), atol=TOLERANCE[dtype] * 10)


def test_from_factors_refuses_factors_that_do_not_fit():
    linear = nn.Linear(20, 12)
    with pytest.raises(ValueError, match=r"do not fit a \(12, 20\) layer"):
        LowRankLinear.from_factors(linear, torch.zeros(12, 3), torch.zeros(4, 20))
    with pytest.raises(ValueError, match="expected"):
        LowRankLinear.from_factors(linear, torch.zeros(20, 3), torch.zeros(3, 12))


def test_autocast_runs_in_bf16_with_fp32_gradients():
    """Issue 13 audit: LowRankLinear is two F.linear calls, so autocast handles it like nn.Linear: bf16 output,
    fp32 factor gradients, within bf16 tolerance of the fp32 computation."""
    generator = torch.Generator().manual_seed(3)
    layer = _factorized(nn.Linear(24, 16), 6)
    x = torch.randn(4, 7, 24, generator=generator)
    grad_out = torch.randn(4, 7, 16, generator=generator)
    expected = layer(x)
    expected.backward(grad_out)
    reference = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out.bfloat16())
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
    for name, param in layer.named_parameters():
        assert param.grad.dtype == torch.float32, name
        assert (param.grad - reference[name]).norm() <= 3e-2 * reference[name].norm(), name
