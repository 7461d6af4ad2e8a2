"""One non-finite policy for every GaLore step: nonfinite="raise" (default) or "skip" (issue 12 item 4).

Each case compares against a run that never saw the bad gradient: "raise" and "skip" must leave weights, inner
moments, bases and counters exactly as they were, and the run must then continue as if the bad step never came.
"""

import copy
import io

import pytest
import torch
from torch import nn

from lowrank_train.nn import quantize_model
from lowrank_train.optim import GaLore, GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit, lowrank_param_groups
from lowrank_train.optim.functional import finite_flags


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))


def build(model: nn.Module, cls=GaLoreAdamW, **kwargs) -> torch.optim.Optimizer:
    groups = lowrank_param_groups(model, rank=4, update_gap=3, target_modules=["0", "2"])
    return cls(groups, lr=1e-2, weight_decay=0.01, **kwargs)


def grads_for(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    return buffer.getvalue()


def poison(tensor: torch.Tensor, value: float) -> None:
    tensor.view(-1)[3] = value


def all_state_tensors(opt: GaLore) -> list[tuple[str, torch.Tensor]]:
    """Every (key, tensor) of GaLore's state and of its inner optimizer's state."""
    states = [*opt.state.values(), *opt._base.state.values()]
    return [(k, t) for s in states for k, t in s.items() if torch.is_tensor(t)]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["lowrank", "plain"])
def test_raise_refuses_a_non_refresh_step_and_changes_nothing(which, value):
    model, reference = make_model(), make_model()
    opt, ref_opt = build(model), build(reference)
    for step in range(2):  # step 2 is not a refresh step (update_gap 3)
        for m, o in ((model, opt), (reference, ref_opt)):
            grads_for(m, step)
            o.step()
    before = snapshot(model, opt)
    grads_for(model, 99)
    bad = model[2].weight if which == "lowrank" else model[2].bias
    poison(bad.grad, value)
    name = "2.weight" if which == "lowrank" else "2.bias"
    with pytest.raises(ValueError, match=rf"non-finite gradient \(NaN/Inf\) in {name} \(shape.*nothing was applied"):
        opt.step()
    assert snapshot(model, opt) == before  # weights, moments, bases, counters: byte for byte
    assert torch.isnan(bad.grad).any() or torch.isinf(bad.grad).any()  # left in .grad for zero_grad
    opt.zero_grad()
    for step in range(2, 6):  # then the run continues as if the bad step never happened
        for m, o in ((model, opt), (reference, ref_opt)):
            grads_for(m, step)
            o.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_skip_skips_the_whole_step_counts_it_and_saves_the_count():
    model, reference = make_model(), make_model()
    opt, ref_opt = build(model, nonfinite="skip"), build(reference)
    for step in range(2):
        for m, o in ((model, opt), (reference, ref_opt)):
            grads_for(m, step)
            o.step()
    before = snapshot(model, opt)
    grads_for(model, 99)
    poison(model[0].weight.grad, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1 and ref_opt.skipped_steps == 0
    assert model[0].weight.grad is not None  # left for zero_grad
    after = torch.load(io.BytesIO(snapshot(model, opt)), weights_only=True)
    expected = torch.load(io.BytesIO(before), weights_only=True)
    assert int(after["opt"]["galore"]["skipped_steps"]) == 1
    after["opt"]["galore"] = expected["opt"]["galore"]
    for key, value in expected["model"].items():
        assert torch.equal(after["model"][key], value)
    for index, state in expected["opt"]["state"].items():
        for key, value in state.items():
            assert torch.equal(after["opt"]["state"][index][key], value), key
    for index, state in expected["opt"]["base"]["state"].items():
        for key, value in state.items():
            assert torch.equal(after["opt"]["base"]["state"][index][key], value), key
    for step in range(2, 6):
        for m, o in ((model, opt), (reference, ref_opt)):
            grads_for(m, step)
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    resumed_model = copy.deepcopy(model)
    resumed = build(resumed_model, nonfinite="skip")
    resumed.load_state_dict(torch.load(io.BytesIO(snapshot(model, opt)), weights_only=True)["opt"])
    assert resumed.skipped_steps == 1


def test_int8_weights_keep_finite_moments_under_a_nan_gradient():
    """Issue 12 item 4: before the policy, the INT8 weight stayed finite while NaN went into the moments."""
    model = quantize_model(make_model(), group_size=8, target_modules=["0"])
    for nonfinite in ("raise", "skip"):
        groups = lowrank_param_groups(model, rank=4, update_gap=3, target_modules=["0"])
        policy = {} if nonfinite == "raise" else {"nonfinite": nonfinite}  # "raise" is the default
        opt = QGaLoreAdamW8bit(groups, lr=1e-2, proj_group_size=8, **policy)
        for step in range(2):
            grads_for(model, step)
            opt.step()
        codes = model[0].weight_codes.clone()
        moments = [t.clone() for _, t in all_state_tensors(opt)]
        grads_for(model, 99)
        poison(model[0].weight.grad, float("nan"))
        if nonfinite == "raise":
            with pytest.raises(ValueError, match=r"0.weight \(shape \(24, 16\)\).*nothing was applied"):
                opt.step()
        else:
            opt.step()
            assert opt.skipped_steps == 1
        assert torch.equal(model[0].weight_codes, codes)
        for (key, now), then in zip(all_state_tensors(opt), moments, strict=True):
            torch.testing.assert_close(now, then, rtol=0, atol=0, equal_nan=True, msg=key)
            if key != "similarity":  # NaN marks "not measured yet" there
                assert not now.is_floating_point() or now.isfinite().all(), key
        model.zero_grad()


def test_nan_in_a_projected_accumulator_is_found_at_step():
    model = make_model()
    opt = build(model)
    grads_for(model, 0)
    opt.step()  # basis built: accumulation below runs between refreshes
    grads_for(model, 1)
    poison(model[0].weight.grad, float("nan"))
    opt.accumulate_grad(model[0].weight)  # no check between refreshes: no host synchronisation
    grads_for(model, 2)
    with pytest.raises(ValueError, match=r"0.weight \(shape \(24, 16\)\) \(its projected accumulator\)"):
        opt.step()
    opt.zero_grad()  # drops the spoiled accumulator too
    assert all("grad_accum" not in s for s in opt.state.values())
    grads_for(model, 3)
    opt.step()
    assert all(p.isfinite().all() for p in model.parameters())


ENTRIES = [0, 5, 37, 100, -1]  # first, middle and last entries of a weight's gradient


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("update", ["galore", "apollo", "fira"])
@pytest.mark.parametrize("projector", ["svd", "random", "identity"])
def test_a_non_refresh_step_checked_through_its_projection_misses_no_entry(projector, update, value):
    """Between refreshes the check reads R = P^T G instead of G: every single bad entry of G must still be refused,
    in both orientations (0.weight is 24 x 16, 2.weight 8 x 24), and leave everything as it was."""
    model = make_model()
    groups = lowrank_param_groups(
        model, rank=4, update_gap=50, target_modules=["0", "2"], projector=projector, update=update
    )
    opt = GaLoreAdamW(groups, lr=1e-2)
    grads_for(model, 0)
    opt.step()  # bases built; the steps below are not refreshes
    for layer in (0, 2):
        for entry in ENTRIES:
            grads_for(model, 1)
            assert not opt.refresh_due(model[layer].weight)
            before = snapshot(model, opt)
            model[layer].weight.grad.view(-1)[entry] = value
            with pytest.raises(ValueError, match=rf"non-finite gradient \(NaN/Inf\) in {layer}.weight "):
                opt.step()
            assert snapshot(model, opt) == before, (layer, entry)
    opt.zero_grad()
    grads_for(model, 2)
    opt.step()  # and a clean step still goes through
    assert all(p.isfinite().all() for p in model.parameters())


def test_a_projection_that_overflows_is_refused_not_applied():
    """A finite gradient whose projection overflows fp32 would write Inf into the weight: it is refused too."""
    model = make_model()
    opt = build(model)
    grads_for(model, 0)
    opt.step()
    grads_for(model, 1)
    before = snapshot(model, opt)
    # 0.weight is 24 x 16: R = P^T G^T, R[0, j] = sum_k P[k, 0] G[j, k]. Signs matching P's first column make
    # R[0, j] = 3e38 * ||P_:,0||_1 > 3.4e38 (||.||_1 > ||.||_2 = 1 unless one entry holds it all).
    first = opt.state[model[0].weight]["basis"][:, 0]
    assert first.abs().sum() > 1.2
    model[0].weight.grad.copy_((3e38 * first.sign()).expand(24, 16))
    assert model[0].weight.grad.isfinite().all()
    with pytest.raises(ValueError, match=r"non-finite gradient \(NaN/Inf\) in 0.weight "):
        opt.step()
    assert snapshot(model, opt) == before


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nan_where_accumulate_grad_would_refresh_the_basis(nonfinite):
    model, reference = make_model(), make_model()
    opt, ref_opt = build(model, nonfinite=nonfinite), build(reference)
    grads_for(model, 0)
    poison(model[2].weight.grad, float("nan"))
    if nonfinite == "raise":
        with pytest.raises(ValueError, match=r"accumulate_grad \(a basis refresh was due\) was refused"):
            opt.accumulate_grad(model[2].weight)
        assert not opt.state and model[2].weight.grad is not None
        opt.zero_grad()
    else:
        opt.accumulate_grad(model[2].weight)  # the step is lost: its other micro-batches are only freed
        grads_for(model, 1)
        opt.accumulate_grad(model[0].weight)
        assert model[0].weight.grad is None
        opt.step()
        assert opt.skipped_steps == 1 and all("grad_accum" not in s for s in opt.state.values())
        opt.zero_grad()
    for step in range(2, 5):
        for m, o in ((model, opt), (reference, ref_opt)):
            grads_for(m, step)
            o.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bf16_gradients_and_the_8bit_preset():
    model = make_model().to(torch.bfloat16)
    opt = build(model, cls=GaLoreAdamW8bit, nonfinite="skip")
    grads_for_bf16 = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=grads_for_bf16).to(torch.bfloat16)
    poison(model[0].bias.grad, float("-inf"))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('raise', 'skip'\), got 'ignore'"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 8))], nonfinite="ignore")


def test_long_lists_of_bad_parameters_are_shortened():
    params = [nn.Parameter(torch.randn(4)) for _ in range(10)]
    opt = GaLoreAdamW([{"params": params, "param_names": [f"p{i}" for i in range(10)]}])
    for p in params:
        p.grad = torch.full((4,), float("nan"))
    with pytest.raises(ValueError, match=r"in p0 \(shape \(4,\)\), .*p5 \(shape \(4,\)\) and 4 more: the step"):
        opt.step()


def test_finite_flags_against_isfinite():
    """The min/max reduction agrees with the elementwise oracle; huge finite values are not flagged."""
    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16)
    cases = [torch.randn(n, generator=g).to(dtype) for n in (1, 7, 33, 4099) for dtype in dtypes]
    for i, t in enumerate(cases):
        if i % 3 == 1:
            t[i % t.numel()] = float("nan")
        elif i % 3 == 2:
            t[-1] = float("-inf") if i % 2 else float("inf")
    cases += [torch.full((5, 3), 3e38), torch.empty(0), torch.randn(6, 4, generator=g).mT]
    expected = torch.tensor([bool(t.isfinite().all()) for t in cases])
    assert torch.equal(finite_flags(cases), expected)
    assert expected.sum() not in (0, len(cases))  # both kinds present
    assert finite_flags([]).shape == (0,)
