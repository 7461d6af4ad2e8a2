"""Stochastic rounding is unbiased and reproducible with an explicit generator."""

import pytest
import torch

from lowrank_train.quant import dequantize, quantize, stochastic_round

torch.set_num_threads(1)

DRAWS = 4000


def test_stochastic_round_is_unbiased_per_element(device):
    y = (torch.randn(256, generator=torch.Generator().manual_seed(0)) * 3).to(device)
    rounded = stochastic_round(y.expand(DRAWS, -1), torch.Generator(device=device).manual_seed(1))
    assert torch.equal(rounded, rounded.round())
    assert ((rounded == y.floor()) | (rounded == y.ceil())).all()
    frac = y - y.floor()
    standard_error = (frac * (1 - frac) / DRAWS).sqrt().clamp_min(1e-6)
    z = (rounded.mean(0) - y) / standard_error
    assert z.abs().max() < 5  # 256 elements at 5 sigma: a false alarm is ~1e-4 likely
    assert z.mean().abs() < 5 / 256**0.5


def test_stochastic_quantize_is_unbiased_after_dequantize(device):
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(2)).to(device)
    generator = torch.Generator(device=device).manual_seed(3)
    draws = torch.stack(
        [dequantize(*quantize(x, 4, 128, stochastic=True, generator=generator), x.shape) for _ in range(DRAWS // 4)]
    )
    _, scales = quantize(x, 4, 128)
    step = scales.repeat_interleave(128).reshape(x.shape)
    errors = (draws - x) / step  # in units of one quantization step
    standard_error = 0.5 / (errors.shape[0] ** 0.5)
    assert errors.mean(0).abs().max() < 5 * standard_error
    assert errors.abs().max() < 1 + 1e-5  # SR never moves more than one step


def test_reproducible_with_generator():
    x = torch.randn(1024)
    first = quantize(x, 8, 256, stochastic=True, generator=torch.Generator().manual_seed(7))
    second = quantize(x, 8, 256, stochastic=True, generator=torch.Generator().manual_seed(7))
    other = quantize(x, 8, 256, stochastic=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_bad_input():
    with pytest.raises(ValueError, match="floating"):
        stochastic_round(torch.ones(3, dtype=torch.int64))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            stochastic_round(torch.ones(3, device="cuda"), torch.Generator())
