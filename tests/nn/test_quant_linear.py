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
    (32, 16, True, 8, 64, torch.float64, 1e-6),  # fp32 scales: the weight itself is fp32-exact only
    (32, 16, True, 8, 64, torch.bfloat16, 2e-2),
]


def make_float(n_in, n_out, bias, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


def make_layer(n_in, n_out, bias, bits, group_size, seed=0):
    return QuantLinear.from_linear(make_float(n_in, n_out, bias, seed), bits, group_size)


def brute_force_quantization(weight, bits, group_size):
    """Group-wise symmetric quantization written from its definition, one group at a time in Python floats:
    groups of ``group_size`` consecutive row-major elements (the last zero-padded), scale ``absmax / qmax``, codes
    ``round(w / scale)``. Returns the dequantized weight and each element's step (its group's scale), float64."""
    qmax = 2 ** (bits - 1) - 1
    values = weight.detach().double().reshape(-1).tolist()
    values += [0.0] * (-len(values) % group_size)
    dequantized, steps = [], []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        absmax = max(abs(v) for v in group)
        scale = (absmax if absmax > 0 else 1.0) / qmax
        dequantized += [max(-qmax, min(qmax, round(v / scale))) * scale for v in group]
        steps += [scale] * group_size
    numel = weight.numel()
    as_tensor = lambda items: torch.tensor(items[:numel], dtype=torch.float64).reshape(weight.shape)  # noqa: E731
    return as_tensor(dequantized), as_tensor(steps)


@pytest.mark.parametrize("n_in,n_out,bias,bits,group_size,dtype,tol", LAYER_CASES)
def test_forward_and_gradients_match_independent_reference(n_in, n_out, bias, bits, group_size, dtype, tol, device):
    """Reference: F.linear with the weight quantized by the brute-force oracle above, never the layer's own
    dequantization; and the layer's weight stays within half a quantization step of the original float weight."""
    linear = make_float(n_in, n_out, bias)
    original = linear.weight.detach().double().clone()
    oracle, steps = brute_force_quantization(linear.weight, bits, group_size)
    layer = QuantLinear.from_linear(linear, bits, group_size).to(device, dtype)
    original, oracle, steps = original.to(device), oracle.to(device), steps.to(device)
    assert ((layer.dequantized_weight(torch.float64) - original).abs() <= steps / 2 * (1 + 1e-6)).all()
    torch.testing.assert_close(layer.dequantized_weight(torch.float64), oracle, rtol=1e-6, atol=1e-9)
    x = torch.randn(3, 5, n_in, dtype=dtype).to(device).requires_grad_(True)
    weight = oracle.to(dtype).requires_grad_(True)
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


AUTOCAST_CASES = [
    # (autocast dtype, bits, bias, tolerance)
    (torch.bfloat16, 8, True, 2e-2),
    (torch.bfloat16, 4, False, 2e-2),
    (torch.float16, 8, True, 2e-3),
]


@pytest.mark.parametrize("amp_dtype,bits,bias,tol", AUTOCAST_CASES)
def test_autocast_matches_nn_linear_under_the_same_autocast(amp_dtype, bits, bias, tol, device):
    """Issue 13: under autocast grad_out is half precision while the input was fp32; the weight-gradient matmul
    used to fail (`expected m1 and m2 to have the same dtype`). Reference: nn.Linear holding the dequantized
    weight, fp32 parameters, the same CPU autocast (the path Trainer bf16=True / accelerate take)."""
    layer = make_layer(32, 16, bias, bits, 32).to(device)
    reference = nn.Linear(32, 16, bias=bias).to(device)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight(torch.float32))
        if bias:
            reference.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 32).to(device).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autocast(device.type, dtype=amp_dtype), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    with torch.autocast(device.type, dtype=amp_dtype):
        expected = reference(x_ref)
    assert out.dtype == expected.dtype == amp_dtype
    assert [dtype for shape, dtype in saved if shape == (3, 5, 32)] == [amp_dtype]  # input saved cast, as nn.Linear
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert layer.weight.grad.dtype == reference.weight.grad.dtype == torch.float32  # parameter precision
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    if bias:
        assert layer.bias.grad.dtype == torch.float32
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=tol, atol=tol)
    # backward called inside the autocast region gives the same gradients (dtypes are fixed in forward)
    first = layer.weight.grad.clone()
    layer.weight.grad = None
    with torch.autocast(device.type, dtype=amp_dtype):
        layer(x).backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, first, rtol=0, atol=0)


def test_quantized_llama_trains_under_cpu_autocast(tiny_llama):
    """A tiny INT8 LLaMA under bf16 autocast: loss and every gradient match the float LLaMA holding the
    dequantized weights under the same autocast, and Q-GaLore steps lower the loss."""
    from lowrank_train import lowrank_param_groups
    from lowrank_train.optim import QGaLoreAdamW8bit

    quantized = quantize_model(tiny_llama, group_size=64)
    reference = dequantize_model(copy.deepcopy(quantized))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (quantized, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=1e-2)
    grads = dict(reference.named_parameters())
    names = [n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14
    for name, param in quantized.named_parameters():
        ref = grads[name].grad
        assert param.grad.dtype == torch.float32, name
        assert (param.grad - ref).norm() <= 2e-2 * ref.norm() + 1e-6, name

    quantized.zero_grad()
    optimizer = QGaLoreAdamW8bit(lowrank_param_groups(quantized, rank=4, update_gap=10), lr=1e-2)
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = quantized(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        final = quantized(input_ids=ids, labels=ids).loss
    assert final < losses[0] - 0.05


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


def test_write_back_is_unbiased_and_reproducible(device):
    base = make_layer(64, 4, False, 8, 64).to(device)
    start = base.dequantized_weight()
    step = base.weight_scales.repeat_interleave(64).reshape(4, 64)
    update = 0.3 * step  # a third of a step: round-to-nearest would drop it
    draws = []
    for seed in range(300):
        layer = copy.deepcopy(base)
        apply_quantized_update(layer.weight, update, generator=torch.Generator(device).manual_seed(seed))
        draws.append(layer.dequantized_weight())
    mean = torch.stack(draws).mean(0)
    standard_error = 0.5 * step / 300**0.5
    assert ((mean - (start + update)).abs() <= 5 * standard_error + 1e-3 * step).all()
    idle = copy.deepcopy(base)
    apply_quantized_update(idle.weight, torch.zeros(4, 64, device=device), generator=torch.Generator(device))
    assert torch.equal(idle.weight_codes, base.weight_codes)  # re-quantizing grid points is exact, even with SR
    first, second = copy.deepcopy(base), copy.deepcopy(base)
    for layer in (first, second):
        apply_quantized_update(layer.weight, update, generator=torch.Generator(device).manual_seed(5))
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
