"""A NaN/Inf gradient inside the layer-wise engine: what was stepped is stepped, the rest is skipped, and the
message says which (issue 12 item 5).

Reference: an ordinary GaLore loop in which the bad parameter simply has no gradient in that step (torch.optim
skips such a parameter). The engine must end in exactly that state, and the next backward must need no repair.
"""

import copy

import pytest
import torch
from torch import nn

from lowrank_train.optim import GaLoreAdamW, LayerwiseOptimizer, lowrank_param_groups

STEPS, BAD_STEP = 5, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def groups(model: nn.Module, update_gap: int) -> list[dict]:
    return lowrank_param_groups(model, rank=4, update_gap=update_gap, target_modules=["0", "2"])


def make_inner(g):
    return GaLoreAdamW(g, lr=1e-2, weight_decay=0.01)


def data(accumulation: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(3)
    return [
        [(torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)) for _ in range(accumulation)]
        for _ in range(STEPS)
    ]


def loss_of(model: nn.Module, batch, accumulation: int) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y) / accumulation


def reference(bad_name: str, accumulation: int, update_gap: int) -> nn.Module:
    model = make_model()
    opt = make_inner(groups(model, update_gap))
    bad = dict(model.named_parameters())[bad_name]
    for step, batches in enumerate(data(accumulation)):
        for k, batch in enumerate(batches):
            loss_of(model, batch, accumulation).backward()
            if step == BAD_STEP:
                bad.grad = None  # the bad parameter takes no part in this step
            if k < accumulation - 1:
                for p in model.parameters():
                    if opt.is_lowrank(p) and p.grad is not None:
                        opt.accumulate_grad(p)
        opt.step()
        opt.zero_grad()
    return model


def poison_at(model: nn.Module, name: str, micro: int, accumulation: int, value: float) -> list[int]:
    """Registers (before the engine's hook) a hook writing ``value`` into ``name``'s gradient at one micro-batch."""
    calls = [0]
    param = dict(model.named_parameters())[name]

    def hook(p: torch.Tensor) -> None:
        if calls[0] == BAD_STEP * accumulation + micro:
            p.grad.view(-1)[0] = value
        calls[0] += 1

    param.register_post_accumulate_grad_hook(hook)
    return calls


CASES = [
    # (bad parameter, accumulation, micro-batch poisoned, update_gap): gap 2 makes step 2 a refresh step, 3 does not
    ("2.weight", 1, 0, 2),
    ("2.weight", 1, 0, 3),
    ("0.bias", 1, 0, 3),
    ("0.weight", 2, 0, 2),  # NaN where accumulate_grad would rebuild the basis: checked before the SVD
    ("0.weight", 2, 0, 3),  # NaN projected into the accumulator, found when the step ends
    ("2.bias", 2, 1, 3),
]


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize(("bad_name", "accumulation", "micro", "update_gap"), CASES)
def test_bad_parameter_is_skipped_and_everything_else_steps(bad_name, accumulation, micro, update_gap, nonfinite):
    model = make_model()
    poison_at(model, bad_name, micro, accumulation, float("nan") if accumulation == 1 else float("inf"))
    policy = {} if nonfinite == "raise" else {"nonfinite": nonfinite}  # "raise" is the default
    opt = LayerwiseOptimizer(groups(model, update_gap), make_inner, accumulation_steps=accumulation, **policy)
    bad = dict(model.named_parameters())[bad_name]
    for step, batches in enumerate(data(accumulation)):
        for k, batch in enumerate(batches):
            loss = loss_of(model, batch, accumulation)
            if step == BAD_STEP and k == accumulation - 1 and nonfinite == "raise":
                with pytest.raises(ValueError) as caught:
                    loss.backward()
                message = str(caught.value)
                assert f"in 1 of 4 parameters in step {BAD_STEP} (counting from 0; " in message
                assert f"optimizer.steps is now {BAD_STEP + 1}): {bad_name} (shape" in message
                assert "Those were not stepped" in message and "every other parameter" in message
                assert "needs no zero_grad()" in message
            else:
                loss.backward()  # no zero_grad() after the bad step: the engine cleared what it skipped
        if step == BAD_STEP:
            assert opt.steps == BAD_STEP + 1 and opt.micro_step == 0
            assert bad.grad is None and torch.isfinite(opt.last_grad_norm)
            assert opt.skipped_steps == 1 and opt.skipped_updates == 1
            inner = opt.inner_optimizer(bad)
            assert "grad_accum" not in inner.state.get(bad, {})
    expected = reference(bad_name, accumulation, update_gap)
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    # The skipped parameter's inner optimizer counted one step fewer, as for a parameter without a gradient.
    counts = {}
    for n, p in model.named_parameters():
        inner = opt.inner_optimizer(p)
        state = inner.state[p] if inner.is_lowrank(p) else inner.base_optimizer.state[p]
        counts[n] = int(state["step"])
    assert counts == {n: STEPS - (n == bad_name) for n in counts}, counts


def test_counters_survive_a_checkpoint():
    model = make_model()
    poison_at(model, "0.bias", 0, 1, float("nan"))
    opt = LayerwiseOptimizer(groups(model, 3), make_inner, nonfinite="skip")
    for batches in data(1)[: BAD_STEP + 1]:
        loss_of(model, batches[0], 1).backward()
    state = opt.state_dict()
    assert int(state["layerwise"]["skipped_steps"]) == 1 and int(state["layerwise"]["skipped_updates"]) == 1
    opt.remove_hooks()
    resumed = LayerwiseOptimizer(groups(copy.deepcopy(model), 3), make_inner, nonfinite="skip")
    resumed.load_state_dict(state)
    assert resumed.skipped_steps == 1 and resumed.skipped_updates == 1 and resumed.steps == BAD_STEP + 1


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip'\), got 'warn'"):
        LayerwiseOptimizer(make_model(), make_inner, nonfinite="warn")
