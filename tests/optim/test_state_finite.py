"""A saved optimizer state holding NaN/Inf is refused at load, naming the parameter and the entry (issue 20 item 7)."""

import io

import pytest
import torch
from torch import nn

from lowrank_train.optim import GaLoreAdamW, LayerwiseOptimizer, QGaLoreAdamW8bit, lowrank_param_groups


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, layerwise: bool = False) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        if not layerwise:
            opt.step()
            opt.zero_grad()


def saved(opt: torch.optim.Optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def galore(model: nn.Module, cls=GaLoreAdamW, **kwargs) -> torch.optim.Optimizer:
    return cls(lowrank_param_groups(model, rank=4, update_gap=2, target_modules=["0", "2"], **kwargs), lr=1e-2)


def poison(tensor: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    flat = tensor.flatten().clone()
    flat[1] = value
    return flat.reshape(tensor.shape)


# (where in the GaLore state dict, the key, the poison, what the message names). Indices: 0 = 0.weight and
# 1 = 2.weight (the low-rank group), 2 = 0.bias and 3 = 2.bias (the plain group).
GALORE_CASES = [
    (("base", 0), "exp_avg", float("nan"), r"0\.weight \(shape \(32, 16\)\).*AdamW state.*'exp_avg' holds 1 NaN/Inf"),
    (("base", 1), "exp_avg_sq", float("inf"), r"2\.weight \(shape \(8, 32\)\).*'exp_avg_sq' holds 1 NaN/Inf"),
    (("base", 3), "exp_avg", float("-inf"), r"2\.bias \(shape \(8,\)\).*'exp_avg' holds 1 NaN/Inf"),
    ((None, 0), "basis", float("nan"), r"0\.weight \(shape \(32, 16\)\).*GaLore state entry 'basis' holds 1"),
]


@pytest.mark.parametrize(("where", "key", "value", "message"), GALORE_CASES, ids=lambda c: str(c)[:20])
def test_nonfinite_galore_state_is_refused_and_nothing_loads(where, key, value, message):
    model = make_model()
    opt = galore(model)
    train(model, opt, 3)
    state = saved(opt)
    section, index = where
    entries = (state["base"] if section else state)["state"][index]
    entries[key] = poison(entries[key], value)
    fresh = galore(make_model())
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(state)
    assert not fresh.state and not fresh.base_optimizer.state  # refused before anything was loaded
    clean = saved(opt)
    fresh.load_state_dict(clean)  # the unpoisoned state still loads


def test_nonfinite_accumulator_and_quantized_basis_scales_are_refused():
    model = make_model()
    opt = galore(model)
    train(model, opt, 1)
    nn.functional.mse_loss(model(torch.randn(4, 16)), torch.randn(4, 8)).backward()
    opt.accumulate_grad(model[0].weight)
    state = saved(opt)
    state["state"][0]["grad_accum"] = poison(state["state"][0]["grad_accum"])
    with pytest.raises(ValueError, match=r"0\.weight .*'grad_accum' holds 1 NaN/Inf"):
        galore(make_model()).load_state_dict(state)

    quantized = galore(model, cls=QGaLoreAdamW8bit, proj_group_size=8, adaptive_refresh=True)
    train(model, quantized, 2)
    state = saved(quantized)
    assert state["state"][0]["similarity"].isnan().any()  # NaN marks unmeasured history slots: loads fine
    galore(make_model(), cls=QGaLoreAdamW8bit, proj_group_size=8, adaptive_refresh=True).load_state_dict(state)
    state["state"][1]["basis_scales"] = poison(state["state"][1]["basis_scales"])
    with pytest.raises(ValueError, match=r"2\.weight .*'basis_scales' holds 1 NaN/Inf"):
        galore(make_model(), cls=QGaLoreAdamW8bit, proj_group_size=8, adaptive_refresh=True).load_state_dict(state)


def test_unnamed_parameter_is_named_by_group_and_index():
    model = make_model()
    groups = [{"params": [model[0].weight, model[2].weight], "rank": 4}, {"params": [model[0].bias, model[2].bias]}]
    opt = GaLoreAdamW(groups, lr=1e-2)
    train(model, opt, 2)
    state = saved(opt)
    state["base"]["state"][3]["exp_avg"] = poison(state["base"]["state"][3]["exp_avg"])
    fresh = make_model()
    groups = [{"params": [fresh[0].weight, fresh[2].weight], "rank": 4}, {"params": [fresh[0].bias, fresh[2].bias]}]
    with pytest.raises(ValueError, match=r"param group 1 params\[1\] \(shape \(8,\)\).*'exp_avg' holds 1 NaN/Inf"):
        GaLoreAdamW(groups, lr=1e-2).load_state_dict(state)


@pytest.mark.parametrize("inner", ["galore", "adamw"])
def test_layerwise_refuses_a_nonfinite_inner_state(inner):
    def make(groups):
        if inner == "galore":
            return GaLoreAdamW(groups, lr=1e-2)
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "rank"} for g in groups], lr=1e-2)

    groups = lowrank_param_groups if inner == "galore" else (lambda m, **_: m)
    model = make_model()
    opt = LayerwiseOptimizer(groups(model, rank=4, target_modules=["0", "2"]), make)
    train(model, opt, 2, layerwise=True)
    state = saved(opt)
    moments = state["inner"][1]["base"]["state"][0] if inner == "galore" else state["inner"][1]["state"][0]
    moments["exp_avg_sq"] = poison(moments["exp_avg_sq"])
    fresh = make_model()
    other = LayerwiseOptimizer(groups(fresh, rank=4, target_modules=["0", "2"]), make)
    name = "2.weight" if inner == "galore" else "0.bias"  # a module's parameters come in module order
    with pytest.raises(ValueError, match=rf"{name} .*'exp_avg_sq' holds 1 NaN/Inf"):
        other.load_state_dict(state)
