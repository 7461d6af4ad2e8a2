"""Group-wise quantization against a brute-force oracle (issue 3, "Done when")."""

import pytest
import torch

from lowrank_train.quant import QuantizedTensor, dequantize, quantize

torch.set_num_threads(1)

CASES = [
    # (shape, bits, group_size, pad)
    ((4, 64), 8, 64, False),
    ((4, 64), 4, 64, False),
    ((3, 100), 8, 256, True),
    ((3, 100), 4, 256, True),
    ((512,), 8, 256, False),
    ((7, 9), 4, 16, True),
]


def brute_force_quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: scale = absmax / qmax; each element takes the code whose value is nearest (exhaustive)."""
    qmax = 2 ** (bits - 1) - 1
    flat = x.reshape(-1).double().tolist()
    flat += [0.0] * (-len(flat) % group_size)
    levels = torch.arange(-qmax, qmax + 1, dtype=torch.float64)
    errors, scales = [], []
    for start in range(0, len(flat), group_size):
        group = torch.tensor(flat[start : start + group_size], dtype=torch.float64)
        absmax = group.abs().max().item()
        scale = absmax / qmax if absmax > 0 else 1.0 / qmax
        best = (group[:, None] - levels[None, :] * scale).abs().min(dim=1).values
        errors.append(best)
        scales.append(scale)
    return torch.cat(errors)[: x.numel()].reshape(x.shape), torch.tensor(scales, dtype=torch.float64)


@pytest.mark.parametrize("shape,bits,group_size,pad", CASES)
def test_error_is_at_most_half_a_step_and_matches_oracle(shape, bits, group_size, pad):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    codes, scales = quantize(x, bits, group_size, pad=pad)
    error = (dequantize(codes, scales, x.shape, torch.float64) - x.double()).abs()
    oracle_error, oracle_scales = brute_force_quantize(x, bits, group_size)
    torch.testing.assert_close(scales.double(), oracle_scales, rtol=1e-6, atol=0)
    step = scales.double().repeat_interleave(group_size)[: x.numel()].reshape(shape)
    assert (error <= step / 2 * (1 + 1e-5)).all()
    torch.testing.assert_close(error, oracle_error, rtol=0, atol=1e-6)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.abs().max() <= qmax


@pytest.mark.parametrize("shape,bits,group_size,pad", CASES)
def test_quantized_tensor_round_trip_and_packing_size(shape, bits, group_size, pad):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    qt = QuantizedTensor.from_float(x, bits, group_size, pad=pad)
    codes, scales = quantize(x, bits, group_size, pad=pad)
    torch.testing.assert_close(qt.dequantize(), dequantize(codes, scales, x.shape))
    expected_bytes = codes.numel() // 2 if bits == 4 else codes.numel()
    assert qt.codes.numel() * qt.codes.element_size() == expected_bytes
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_state_round_trip_with_weights_only(tmp_path):
    x = torch.randn(32, 24)
    qt = QuantizedTensor.from_float(x, 4, 64)
    state = qt.to_state("basis")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save(state, tmp_path / "state.pt")
    loaded = QuantizedTensor.from_state(torch.load(tmp_path / "state.pt", weights_only=True), "basis")
    assert loaded.shape == qt.shape and loaded.bits == 4 and loaded.group_size == 64
    torch.testing.assert_close(loaded.dequantize(), qt.dequantize())


def test_zero_group_and_bf16_input():
    x = torch.zeros(2, 256)
    x[1] = torch.randn(256)
    codes, scales = quantize(x.bfloat16(), 8, 256)
    out = dequantize(codes, scales, x.shape)
    assert torch.equal(out[0], torch.zeros(256)) and torch.isfinite(out).all()
    assert scales.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=3), "bits must be one of"),
        (dict(bits=16), "bits must be one of"),
        (dict(group_size=0), "positive int"),
        (dict(group_size=100), "refuses to pad"),
    ],
)
def test_bad_input(kwargs, message):
    args = dict(bits=8, group_size=256) | kwargs
    with pytest.raises(ValueError, match=message):
        quantize(torch.randn(4, 64), args["bits"], args["group_size"])


def test_bad_input_integer_tensor_and_odd_int4_group():
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.ones(256, dtype=torch.int32), 8, 256)
    with pytest.raises(ValueError, match="even"):
        QuantizedTensor.from_float(torch.randn(9), 4, 3)
