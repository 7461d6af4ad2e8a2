"""A parameter listed twice, in one group or in two, is refused at construction, naming it (issue 20)."""

import warnings

import pytest
import torch
from torch import nn

from lowrank_train.optim import GaLoreAdamW, LayerwiseOptimizer, lowrank_param_groups


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def galore(groups):
    return GaLoreAdamW(groups, lr=1e-3)


def layerwise(groups):
    return LayerwiseOptimizer(groups, lambda g: GaLoreAdamW(g, lr=1e-3))


def twice_in_lowrank_group(m):
    return [{"params": [m[0].weight, m[2].weight, m[0].weight], "param_names": ["w0", "w2", "w0"], "rank": 4}]


def in_two_groups(m):
    return [{"params": [m[2].weight], "param_names": ["w2"], "rank": 4}, {"params": [m[0].bias, m[2].weight]}]


def in_two_lowrank_groups(m):
    return [{"params": [m[0].weight], "rank": 4}, {"params": [m[0].weight], "rank": 4}]


def twice_from_param_groups(m):
    groups = lowrank_param_groups(m, rank=4, target_modules=["0", "2"])
    groups[1]["params"].append(m[0].weight)  # e.g. a hand-written extra group
    groups[1]["param_names"].append("0.weight")
    return groups


# (groups, what the message names)
CASES = [
    (twice_in_lowrank_group, r"param group 0: w0 \(shape \(32, 16\)\) is also earlier in this group as w0"),
    (in_two_groups, r"param group 1: params\[1\] \(shape \(8, 32\)\) is also in param group 0 as w2"),
    (in_two_lowrank_groups, r"param group 1: params\[0\] \(shape \(32, 16\)\) is also in param group 0"),
    (twice_from_param_groups, r"param group 1: 0\.weight \(shape \(32, 16\)\) is also in param group 0 as 0\.weight"),
]


@pytest.mark.parametrize("build", [galore, layerwise], ids=["galore", "layerwise"])
@pytest.mark.parametrize(("groups", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_repeated_parameter_is_refused_naming_it(build, groups, message):
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused by us, before torch's "duplicate parameters" warning
        with pytest.raises(ValueError, match=message):
            build(groups(model))


@pytest.mark.parametrize("build", [galore, layerwise], ids=["galore", "layerwise"])
def test_add_param_group_refuses_a_parameter_already_added(build):
    model = make_model()
    opt = build(lowrank_param_groups(model, rank=4, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"param group 2: params\[0\] \(shape \(32, 16\)\) is also in param group 0"):
        opt.add_param_group({"params": model[0].weight})
    assert len(opt.param_groups) == 2  # nothing was added


def test_distinct_parameters_still_build():
    model = make_model()
    groups = [{"params": (p for p in [model[0].weight, model[2].weight]), "rank": 4}, {"params": [model[0].bias]}]
    opt = galore(groups)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
