"""The optimizer registry: lookups, errors, registration, and that each entry builds what it describes.

That every consumer (config, estimator, loop, Trainer glue) accepts a newly registered method is checked in
``tests/train/test_custom_optimizer.py``.
"""

import sys

import pytest
import torch
from torch import nn

from lowrank_train.optim import (
    BASE_OPTIMIZERS,
    GALORE_GROUP_OPTIONS,
    GaLore,
    OptimizerMethod,
    get_optimizer_method,
    lowrank_param_groups,
    optimizer_names,
    register_optimizer,
    registered_optimizer,
    resolve_base,
    unregister_optimizer,
)
from lowrank_train.optim.galore import GALORE_DEFAULTS


def _sgd_galore(groups, **hyperparameters):
    return GaLore(groups, base="sgd", lr=hyperparameters["lr"])


def _method(**overrides):
    fields = dict(
        name="galore_sgd",
        description="GaLore around SGD",
        base="sgd",
        moment_bits=32,
        lowrank=True,
        build=_sgd_galore,
        group_options=GALORE_GROUP_OPTIONS,
    )
    fields.update(overrides)
    return OptimizerMethod(**fields)


def test_builtin_methods_and_their_facts():
    assert optimizer_names() == ("adamw", "adamw8bit", "galore", "galore8bit", "qgalore", "qgalore4bit")
    assert optimizer_names(lowrank=True) == ("galore", "galore8bit", "qgalore", "qgalore4bit")
    assert optimizer_names(lowrank=False) == ("adamw", "adamw8bit")
    facts = {
        n: (m.base, m.moment_bits, m.weight_bits, m.proj_bits, m.adaptive_refresh)
        for n in optimizer_names()
        for m in [get_optimizer_method(n)]
    }
    assert facts == {
        "adamw": ("adamw", 32, None, None, False),
        "adamw8bit": ("adamw8bit", 8, None, None, False),
        "galore": ("adamw", 32, None, None, False),
        "galore8bit": ("adamw8bit", 8, None, None, False),
        "qgalore": ("adamw8bit", 8, 8, 4, True),
        "qgalore4bit": ("adamw4bit", 4, 8, 4, True),
    }
    for name in optimizer_names():
        method = get_optimizer_method(name)
        assert method.base in BASE_OPTIMIZERS and method.description
        assert method.accepts("proj_bits") == method.lowrank
    assert GALORE_GROUP_OPTIONS == {"rank", *GALORE_DEFAULTS}


def test_unknown_names_list_the_registered_ones_and_suggest_the_closest():
    assert get_optimizer_method("qgalore").name == "qgalore"
    with pytest.raises(ValueError, match="did you mean 'qgalore'"):
        get_optimizer_method("QGaLore")  # names are exact: a config spells one method one way
    with pytest.raises(
        ValueError, match=r"unknown optimizer 'galor8bit' \(did you mean 'galore8bit'\?\); registered: adamw,"
    ):
        get_optimizer_method("galor8bit")
    with pytest.raises(ValueError, match="registered: adamw, adamw8bit, galore") as info:
        get_optimizer_method("lion")
    assert "did you mean" not in str(info.value)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "galore", "galore8bit", "qgalore", "qgalore4bit"])
def test_each_builtin_builds_an_optimizer_that_steps(name):
    method = get_optimizer_method(name)
    model = _tiny_model()
    if method.lowrank:
        groups = lowrank_param_groups(model, rank=2, update_gap=2, proj_group_size=8)
    else:
        groups = [{"params": list(model.parameters())}]
    optimizer = method.build(groups, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    assert isinstance(optimizer, GaLore) == method.lowrank
    # The entry's facts describe what it builds: its inner optimizer is the registered base it names.
    inner = optimizer._base_cls if method.lowrank else type(optimizer)
    assert inner is resolve_base(method.base)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 16)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_optional_packages_are_imported_only_by_the_builder():
    """Importing the registry (and so the package) must not pull bitsandbytes or torchao in."""
    import subprocess

    code = (
        "import sys, lowrank_train.optim.registry as r; "
        "assert 'bitsandbytes' not in sys.modules and 'torchao' not in sys.modules, sorted(sys.modules); "
        "r.get_optimizer_method('adamw8bit'); assert 'bitsandbytes' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_unregister_and_context_manager():
    method = _method()
    assert register_optimizer(method) is method
    try:
        assert "galore_sgd" in optimizer_names(lowrank=True)
        with pytest.raises(ValueError, match="already registered"):
            register_optimizer(method)
        replacement = _method(description="another")
        register_optimizer(replacement, replace=True)
        assert get_optimizer_method("galore_sgd") is replacement
    finally:
        assert unregister_optimizer("galore_sgd").name == "galore_sgd"
    assert "galore_sgd" not in optimizer_names()
    with pytest.raises(ValueError, match="unknown optimizer"):
        unregister_optimizer("galore_sgd")

    original = get_optimizer_method("galore")
    with registered_optimizer(_method(name="galore")):
        assert get_optimizer_method("galore").base == "sgd"
    assert get_optimizer_method("galore") is original  # a replaced entry comes back
    with registered_optimizer(_method()):
        assert "galore_sgd" in optimizer_names()
    assert "galore_sgd" not in optimizer_names()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"name": "Galore SGD"}, "lower-case"),
        ({"base": "lion"}, "base must be one of"),
        ({"moment_bits": 16}, "moment_bits"),
        ({"build": None}, "callable"),
        ({"weight_bits": 4}, "weight_bits"),
        ({"proj_bits": 2}, "proj_bits"),
        ({"lowrank": False}, "cannot set"),
        ({"lowrank": False, "group_options": frozenset(), "weight_bits": 8}, "cannot set"),
    ],
)
def test_entries_are_validated(overrides, match):
    with pytest.raises(ValueError, match=match):
        _method(**overrides)
    with pytest.raises(ValueError, match="takes an OptimizerMethod"):
        register_optimizer("galore")
