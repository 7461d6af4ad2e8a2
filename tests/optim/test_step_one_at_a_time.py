"""A per-parameter base optimizer is stepped one projected weight at a time (issue 21): the result equals one base
step over every weight, bit for bit, while only one weight's projected gradient R and inner update R~ exist."""

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
        CountingAdamW.calls.append((sum(p.dim() == 2 and p.shape[0] == 4 for p in with_grad), len(with_grad)))
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


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 12), nn.Tanh(), nn.Linear(12, 8))


def run(base, update: str, steps: int = 5) -> tuple[nn.Module, list[torch.Tensor]]:
    model = make_model()
    groups = lowrank_param_groups(model, rank=4, update_gap=2, target_modules=["0", "2", "4"], update=update)
    opt = GaLore(groups, base=base, lr=1e-2, weight_decay=0.01)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        model.zero_grad()
        loss = nn.functional.mse_loss(model(torch.randn(6, 16, generator=g)), torch.randn(6, 8, generator=g))
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


def test_each_projected_weight_has_a_base_step_of_its_own(counting_base):
    """Per step: one base step for the plain weights (the biases) and one per projected weight, which holds the
    only gradient; the projected gradients are released weight by weight."""
    model = make_model()
    groups = lowrank_param_groups(model, rank=4, update_gap=50, target_modules=["0", "2", "4"])
    opt = GaLore(groups, base=counting_base, lr=1e-2)
    for _ in range(2):
        CountingAdamW.calls = []
        model.zero_grad()
        nn.functional.mse_loss(model(torch.randn(6, 16)), torch.randn(6, 8)).backward()
        opt.step()
        assert CountingAdamW.calls == [(0, 3), (1, 1), (1, 1), (1, 1)]


def test_an_unknown_base_gets_one_step_for_all():
    CountingAdamW.calls = []
    model = make_model()
    groups = lowrank_param_groups(model, rank=4, update_gap=50, target_modules=["0", "2", "4"])
    opt = GaLore(groups, base=CountingAdamW, lr=1e-2)  # a class not registered as per-parameter
    nn.functional.mse_loss(model(torch.randn(6, 16)), torch.randn(6, 8)).backward()
    opt.step()
    assert CountingAdamW.calls == [(3, 6)]
