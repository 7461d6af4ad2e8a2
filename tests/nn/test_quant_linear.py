"""INT8-weight linear layer, stochastic-rounding write-back and model conversion (issue 3 part 4)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_train.nn import (
    QuantLinear,
    apply_quantized_update,
    dequantize_model,
    is_quantized_weight,
    quantize_model,
)
from lowrank_train.quant import QuantizedTensor

torch.set_num_threads(1)


class TinyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False)
        self.up_proj = nn.Linear(width, 2 * width)
        self.down_proj = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(F.relu(self.up_proj(self.q_proj(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16, depth: int = 2, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(TinyBlock(width) for _ in range(depth))
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


LAYER_CASES = [
    # (in, out, bias, bits, group_size, input dtype, tolerance)
    (32, 16, True, 8, 64, torch.float32, 1e-5),
    (20, 6, False, 8, 256, torch.float32, 1e-5),  # group does not divide: padded
    (32, 16, True, 4, 32, torch.float32, 1e-5),
    (32, 16, True, 8, 64, torch.float64, 1e-10),
    (32, 16, True, 8, 64, torch.bfloat16, 2e-2),
]


def make_layer(n_in, n_out, bias, bits, group_size, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(n_in, n_out, bias=bias), bits, group_size)


@pytest.mark.parametrize("n_in,n_out,bias,bits,group_size,dtype,tol", LAYER_CASES)
def test_forward_and_gradients_match_float_reference(n_in, n_out, bias, bits, group_size, dtype, tol):
    layer = make_layer(n_in, n_out, bias, bits, group_size).to(dtype)
    x = torch.randn(3, 5, n_in, dtype=dtype, requires_grad=True)
    weight = layer.dequantized_weight(dtype).requires_grad_(True)
    bias_ref = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = F.linear(x_ref, weight, bias_ref)
    out = layer(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert is_quantized_weight(layer.weight) and layer.weight.grad.shape == (n_out, n_in)
    torch.testing.assert_close(layer.weight.grad, weight.grad.to(layer.weight.dtype), rtol=tol, atol=tol * 10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol * 10)
    if bias:
        torch.testing.assert_close(layer.bias.grad, bias_ref.grad, rtol=tol, atol=tol * 10)


def test_weight_is_codes_and_scales_with_no_float_copy():
    layer = make_layer(64, 32, True, 8, 256)
    assert layer.weight_codes.dtype == torch.int8 and layer.weight_scales.dtype == torch.float32
    assert layer.weight.untyped_storage().nbytes() == 4  # the carrier is one element expanded to (32, 64)
    float_bytes = sum(b.numel() * b.element_size() for b in layer.buffers() if b.is_floating_point())
    assert float_bytes == layer.weight_scales.numel() * 4
    assert set(layer.state_dict()) == {"weight_codes", "weight_scales", "bias"}


def test_plain_torch_optimizer_raises_instead_of_corrupting():
    layer = make_layer(16, 8, True, 8, 32)
    layer(torch.randn(2, 16)).sum().backward()
    codes = layer.weight_codes.clone()
    for optimizer in (torch.optim.SGD(layer.parameters(), lr=0.1), torch.optim.AdamW(layer.parameters())):
        with pytest.raises(RuntimeError, match="apply_quantized_update"):
            optimizer.step()
    with pytest.raises(RuntimeError):
        layer.weight.data.add_(1.0)
    assert torch.equal(layer.weight_codes, codes)


def test_link_survives_to_deepcopy_pickle_and_state_dict():
    layer = make_layer(16, 8, True, 8, 32)
    layer(torch.randn(2, 16)).sum().backward()
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.weight.grad.dtype == torch.float64
    assert layer.weight_scales.dtype == torch.float32  # scales never rounded by .to(dtype)
    assert layer.weight.codes is layer.weight_codes and layer.weight.stride() == (0, 0)
    clone = copy.deepcopy(layer)
    assert clone.weight.codes is clone.weight_codes and clone.weight_codes is not layer.weight_codes
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert is_quantized_weight(loaded.weight) and loaded.weight.codes is loaded.weight_codes
    fresh = QuantLinear(16, 8, group_size=32)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.weight.codes is fresh.weight_codes
    torch.testing.assert_close(fresh.dequantized_weight(), layer.dequantized_weight(torch.float32))
    apply_quantized_update(fresh.weight, torch.ones(8, 16), generator=torch.Generator())
    expected = layer.dequantized_weight(torch.float32) + 1
    torch.testing.assert_close(fresh.dequantized_weight(), expected, atol=0.05, rtol=0)


def test_write_back_is_unbiased_and_reproducible():
    base = make_layer(64, 4, False, 8, 64)
    start = base.dequantized_weight()
    step = base.weight_scales.repeat_interleave(64).reshape(4, 64)
    update = 0.3 * step  # a third of a step: round-to-nearest would drop it
    draws = []
    for seed in range(300):
        layer = copy.deepcopy(base)
        apply_quantized_update(layer.weight, update, generator=torch.Generator().manual_seed(seed))
        draws.append(layer.dequantized_weight())
    mean = torch.stack(draws).mean(0)
    standard_error = 0.5 * step / 300**0.5
    assert ((mean - (start + update)).abs() <= 5 * standard_error + 1e-3 * step).all()
    idle = copy.deepcopy(base)
    apply_quantized_update(idle.weight, torch.zeros(4, 64), generator=torch.Generator())
    assert torch.equal(idle.weight_codes, base.weight_codes)  # re-quantizing grid points is exact, even with SR
    first, second = copy.deepcopy(base), copy.deepcopy(base)
    for layer in (first, second):
        apply_quantized_update(layer.weight, update, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.weight_codes, second.weight_codes)


def test_weight_decay_factor():
    layer = make_layer(32, 8, False, 8, 32)
    start = layer.dequantized_weight()
    apply_quantized_update(layer.weight, torch.zeros(8, 32), weight_decay_factor=0.5, stochastic=False)
    torch.testing.assert_close(layer.dequantized_weight(), start * 0.5, atol=1e-6, rtol=1e-5)


def train_regression(mode: str, steps: int = 300, lr: float = 1e-3) -> tuple[float, float]:
    """Adam in fp32 on y = X W*; the weight starts at W0 and the target is a small move away."""
    generator = torch.Generator().manual_seed(0)
    w0 = torch.rand(16, 32, generator=generator) * 2 - 1
    w_true = w0 + 0.05 * torch.randn(16, 32, generator=generator)
    inputs = torch.randn(256, 32, generator=generator)
    targets = inputs @ w_true.T
    linear = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w0)
    layer = linear if mode == "float" else QuantLinear.from_linear(linear, 8, 32)
    weight = layer.weight
    exp_avg, exp_avg_sq = torch.zeros(16, 32), torch.zeros(16, 32)
    rounding = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        loss = F.mse_loss(layer(inputs), targets)
        weight.grad = None
        loss.backward()
        grad = weight.grad
        exp_avg.lerp_(grad, 0.1)
        exp_avg_sq.mul_(0.999).addcmul_(grad, grad, value=0.001)
        update = -lr * (exp_avg / (1 - 0.9**step)) / ((exp_avg_sq / (1 - 0.999**step)).sqrt() + 1e-8)
        if mode == "float":
            with torch.no_grad():
                weight.add_(update)
        else:
            apply_quantized_update(weight, update, generator=rounding, stochastic=mode == "stochastic")
        if step == 1:
            initial = loss.item()
    with torch.no_grad():
        return initial, F.mse_loss(layer(inputs), targets).item()


def test_ablation_stochastic_rounding_trains_while_round_to_nearest_stalls():
    # Q-GaLore Sec. 4 ablation: Adam updates (~lr = 1e-3) are below half an INT8 step (~4e-3 here).
    initial, float_loss = train_regression("float")
    _, stochastic_loss = train_regression("stochastic")
    _, nearest_loss = train_regression("nearest")
    assert float_loss < 1e-3 * initial
    assert stochastic_loss < 0.02 * initial  # within 2% of the starting loss of the float run's endpoint
    assert stochastic_loss - float_loss < 0.02 * initial
    assert nearest_loss > 0.5 * initial  # the updates vanish in rounding


def test_quantize_model_default_targets_blocks_only():
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 7))
    reference = model(ids)
    quantize_model(model, group_size=64)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert names == {f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "up_proj", "down_proj")}
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(model(ids), reference, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)


@pytest.mark.parametrize(
    "target_modules,expected",
    [
        ("all-linear", 6),
        (["q_proj"], 2),
        (r"layers\.0\..*", 3),
    ],
)
def test_quantize_model_target_selection(target_modules, expected):
    model = quantize_model(TinyLM(tie=True), target_modules=target_modules)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == expected
    assert type(model.lm_head) is nn.Linear


def test_dequantize_model_exports_plain_float_linears():
    model = quantize_model(TinyLM(), group_size=64)
    ids = torch.randint(0, 50, (2, 7))
    expected = model(ids)
    dequantize_model(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(type(p) is nn.Parameter for p in model.parameters())
    torch.testing.assert_close(model(ids), expected)
    quantize_model(model, group_size=64)  # a dequantized model can be quantized again


def test_bad_input():
    plain = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="non-quantized|quantized weight"):
        apply_quantized_update(plain.weight, torch.zeros(4, 4), generator=torch.Generator())
    layer = make_layer(8, 4, True, 8, 32)
    with pytest.raises(ValueError, match="shape"):
        apply_quantized_update(layer.weight, torch.zeros(4, 4), generator=torch.Generator())
    with pytest.raises(ValueError, match="bits"):
        quantize_model(TinyLM(), bits=2)
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(TinyLM(), group_size=0)
    with pytest.raises(ValueError, match="matched no"):
        quantize_model(TinyLM(), target_modules=["nope"])
    with pytest.raises(ValueError, match="bits"):
        QuantizedTensor.from_float(torch.randn(8), 5, 8)
