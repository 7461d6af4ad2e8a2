"""requantize_update, the INT8/INT4 write-back: a brute-force oracle for the grid and unbiasedness over many draws."""

import pytest
import torch

from lowrank_train.quant import QuantizedTensor
from lowrank_train.quant.writeback import requantize_update

QMAX = {8: 127, 4: 7}


def _case(bits: int) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A quantized (6, 40) weight, an update of about a third of a step, the exact target and its grid step."""
    g = torch.Generator().manual_seed(bits)
    weight = QuantizedTensor.from_float(torch.randn(6, 40, generator=g), bits, 16)  # 40 = 2.5 groups per row
    target = weight.dequantize(torch.float32) * 0.9
    update = torch.randn(6, 40, generator=g) * 0.3 * target.abs().max() / QMAX[bits]
    target = target + update
    # Brute force: the fresh group scales, absmax / qmax over consecutive groups of 16 (zero-padded).
    padded = torch.cat([target.flatten(), torch.zeros(-target.numel() % 16)]).reshape(-1, 16)
    steps = (padded.abs().amax(1) / QMAX[bits]).repeat_interleave(16)[: target.numel()].reshape(target.shape)
    return weight, update, target, steps


@pytest.mark.parametrize("bits", [8, 4])
def test_round_to_nearest_is_the_nearest_point_of_the_fresh_grid(bits):
    weight, update, target, steps = _case(bits)
    codes_before = weight.codes.clone()
    result = requantize_update(weight, update, weight_decay_factor=0.9, stochastic=False)
    assert torch.equal(weight.codes, codes_before)  # the input is left as it was
    assert (result.bits, result.group_size, result.shape) == (bits, 16, (6, 40))
    expected = torch.round(target / steps) * steps
    torch.testing.assert_close(result.dequantize(torch.float32), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased_and_within_one_step(bits):
    weight, update, target, steps = _case(bits)
    draws = 2000
    below, above = torch.floor(target / steps) * steps, torch.ceil(target / steps) * steps
    total = torch.zeros_like(target)
    for seed in range(draws):
        generator = torch.Generator().manual_seed(seed)
        got = requantize_update(weight, update, weight_decay_factor=0.9, generator=generator).dequantize(torch.float32)
        near = 1e-5 * steps + 1e-7
        assert ((got - below).abs() <= near).logical_or((got - above).abs() <= near).all()  # a neighbouring point
        total += got
    # The standard error of the mean is at most step / (2 sqrt(draws)) ~ 0.011 step: 5 of them, per element.
    assert ((total / draws - target).abs() <= 0.06 * steps).all()
