"""A per-parameter base optimizer is stepped a few projected weights at a time (issue 21): the result equals one
base step over every weight, bit for bit, while the inner updates R~ alive at once fit in the largest weight."""

import pytest
import torch
from torch import nn

from lowrank_train.optim import GaLore, lowrank_param_groups
from lowrank_train.optim.bases import BASE_OPTIMIZERS, PER_PARAMETER_BASES, steps_each_parameter_alone


class WholeStepAdamW(torch.optim.AdamW):
    """torch's AdamW under another class: not known to be per-parameter, so GaLore gives it one step for all."""


class CountingAdamW(torch.optim.AdamW):
    """Records, at each of its steps, how many shadows (GaLore's projected weights) and plain weights it updates."""

    calls: list[tuple[int, int]] = []

    def step(self, closure=None):
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        CountingAdamW.calls.append((sum(p.dim() == 2 for p in with_grad), len(with_grad)))  # 2-D: GaLore's shadows
        return super().step(closure)


@pytest.fixture
def counting_base():
    key = "counting_adamw"
    BASE_OPTIMIZERS[key] = f"{CountingAdamW.__module__}:{CountingAdamW.__qualname__}"
    PER_PARAMETER_BASES.add(key)
    CountingAdamW.calls = []
    try:
        yield key
    finally:
        BASE_OPTIMIZERS.pop(key, None)
        PER_PARAMETER_BASES.discard(key)


def wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 64))


def run(base, update: str, steps: int = 5) -> tuple[nn.Module, GaLore]:
    model = wide_model()  # rank 7: one base step per weight (see the next test)
    groups = lowrank_param_groups(model, rank=7, update_gap=2, target_modules=["0", "2", "4"], update=update)
    opt = GaLore(groups, base=base, lr=1e-2, weight_decay=0.01)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        model.zero_grad()
        loss = nn.functional.mse_loss(model(torch.randn(6, 8, generator=g)), torch.randn(6, 64, generator=g))
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        # The gradients are still in .grad after the step (plain ones were set aside during the projected steps).
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    return model, opt


@pytest.mark.parametrize("update", ["galore", "apollo", "fira"])
def test_one_weight_at_a_time_equals_one_step_for_all(update):
    assert steps_each_parameter_alone(torch.optim.AdamW) and not steps_each_parameter_alone(WholeStepAdamW)
    streamed, opt = run("adamw", update)
    whole, whole_opt = run(WholeStepAdamW, update)
    for a, b in zip(streamed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    base, whole_base = opt.state_dict()["base"]["state"], whole_opt.state_dict()["base"]["state"]
    assert base.keys() == whole_base.keys()
    for key in base:
        for name in base[key]:
            assert torch.equal(base[key][name], whole_base[key][name]), (key, name)


@pytest.mark.parametrize(("rank", "expected"), [(7, [(0, 3), (1, 1), (1, 1), (1, 1)]), (1, [(3, 6)])])
def test_base_steps_take_as_many_weights_as_fit_in_the_largest(counting_base, rank, expected):
    """Weights of 512 entries: at rank 7 each R~ is 7 x 64 = 448 entries, so each weight gets a base step of its
    own (after one for the biases); at rank 1 (APOLLO-Mini's) all three fit in one step with the biases."""
    model = wide_model()
    groups = lowrank_param_groups(model, rank=rank, update_gap=50, target_modules=["0", "2", "4"])
    opt = GaLore(groups, base=counting_base, lr=1e-2)
    for _ in range(2):
        CountingAdamW.calls = []
        model.zero_grad()
        nn.functional.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 64)).backward()
        opt.step()
        assert CountingAdamW.calls == expected


def test_an_unknown_base_gets_one_step_for_all():
    CountingAdamW.calls = []
    model = wide_model()
    groups = lowrank_param_groups(model, rank=7, update_gap=50, target_modules=["0", "2", "4"])
    opt = GaLore(groups, base=CountingAdamW, lr=1e-2)  # a class not registered as per-parameter
    nn.functional.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 64)).backward()
    opt.step()
    assert CountingAdamW.calls == [(3, 6)]
