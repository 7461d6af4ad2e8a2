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
from lowrank_train.projection import svd_basis
from lowrank_train.quant import QuantizedTensor


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


BUILTINS = ("adamw", "adamw8bit", "galore", "galore8bit", "qgalore", "qgalore4bit")
# Full-rank structured updates (issue 21): checked against their references in tests/optim/test_update_rules.py.
STRUCTURED = ("apollo", "apollo_mini", "qapollo_mini", "fira")
# Stateless structured updates (issue 21): SCALE, checked against its dense reference in tests/optim/test_scale.py.
STATELESS = ("scale",)


def test_builtin_names():
    assert optimizer_names() == BUILTINS + STRUCTURED + STATELESS
    assert optimizer_names(lowrank=True) == tuple(n for n in BUILTINS + STRUCTURED if get_optimizer_method(n).lowrank)
    assert optimizer_names(lowrank=False) == ("adamw", "adamw8bit", "scale")
    assert GALORE_GROUP_OPTIONS == {"rank", *GALORE_DEFAULTS}


def _bits_per_element(tensor: torch.Tensor) -> int:
    """Storage bits per logical element (torchao's 4-bit states keep their codes in ``.codes``)."""
    codes = getattr(tensor, "codes", tensor)
    return codes.numel() * codes.element_size() * 8 // tensor.numel()


def _built_and_stepped(name: str) -> tuple[torch.optim.Optimizer, nn.Parameter]:
    # 8 x 1024 projected moments: big enough for bitsandbytes' and torchao's quantized states (>= 4096 elements).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 64))
    method = get_optimizer_method(name)
    if method.lowrank:
        groups = lowrank_param_groups(model, rank=8, update_gap=100, proj_group_size=8)
    else:
        groups = [{"params": list(model.parameters())}]
    optimizer = method.build(groups, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    model(torch.randn(4, 1024)).square().mean().backward()
    optimizer.step()
    return optimizer, model[0].weight


@pytest.mark.parametrize("name", BUILTINS)
def test_each_entry_describes_what_it_builds(name):
    """The facts are measured on the built optimizer's state, not restated."""
    method = get_optimizer_method(name)
    assert method.base in BASE_OPTIMIZERS and method.description
    assert method.accepts("proj_bits") == method.lowrank
    optimizer, weight = _built_and_stepped(name)
    assert isinstance(optimizer, GaLore) == method.lowrank
    inner = optimizer._base if method.lowrank else optimizer
    assert type(inner) is resolve_base(method.base)
    moments = [state.get("exp_avg", state.get("state1")) for state in inner.state.values()]
    assert _bits_per_element(max(moments, key=torch.Tensor.numel)) == method.moment_bits
    if method.lowrank:
        state = optimizer.state[weight]
        stored = state["basis_codes"] if "basis_codes" in state else state["basis"]
        proj_bits = stored.numel() * stored.element_size() * 8 // (64 * 8)  # the basis is 64 x 8
        assert proj_bits == (method.proj_bits or 32)
        assert ("similarity" in state) == method.adaptive_refresh


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


@pytest.mark.parametrize("name", BUILTINS)
def test_each_builtin_steps_like_its_base_on_the_projected_gradient(name):
    """Reference: the registered base optimizer itself, on the weights (plain methods) or on Z (r x n) with the
    projected gradients P^T G, W = W0 + scale P Z (GaLore family; P from the first gradient, int4 codes with
    ``proj_bits``). The bias gets the base optimizer directly."""
    method = get_optimizer_method(name)
    model = _tiny_model()
    hyperparameters = dict(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    if method.lowrank:
        groups = lowrank_param_groups(model, rank=2, update_gap=100, proj_group_size=8)
    else:
        groups = [{"params": list(model.parameters())}]
    optimizer = method.build(groups, **hyperparameters)
    weights = [model[0].weight, model[2].weight]
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    mirrors = [nn.Parameter(p.detach().clone()) for p in params]
    reference, bases = None, {}
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 16, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        grads = [p.grad.clone() for p in params]
        for i, p in enumerate(params):
            if method.lowrank and any(p is w for w in weights):
                if i not in bases:
                    bases[i] = svd_basis(grads[i], 2)
                    if method.proj_bits:
                        bases[i] = QuantizedTensor.from_float(bases[i], method.proj_bits, 8).dequantize(torch.float32)
                    mirrors[i] = nn.Parameter(torch.zeros(2, p.shape[1]))
                mirrors[i].grad = bases[i].T @ grads[i]
            else:
                mirrors[i].grad = grads[i]
        if reference is None:
            reference = resolve_base(method.base)(mirrors, **hyperparameters)
        optimizer.step()
        reference.step()
        scale = optimizer.param_groups[0]["scale"] if method.lowrank else 1.0
        for i, p in enumerate(params):
            want = start[i] + scale * bases[i] @ mirrors[i].detach() if i in bases else mirrors[i].detach()
            torch.testing.assert_close(p.detach(), want, atol=1e-5, rtol=1e-5, msg=f"{name} step {step} param {i}")


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


def test_scale_entry_states_its_own_state_layout():
    """SCALE's entry carries its state bytes (the estimator reads them); measured on the built optimizer: after a
    step only the head holds a tensor of its size, and the 1-D gains AdamW's two moments."""
    from lowrank_train.optim import SCALE

    method = get_optimizer_method("scale")
    assert method.state_bytes is not None and not method.lowrank
    torch.manual_seed(0)
    head, hidden, gain = nn.Linear(8, 16, bias=False), nn.Linear(8, 8, bias=False), nn.Parameter(torch.ones(8))
    groups = [
        {"params": [hidden.weight, gain, head.weight], "param_names": ["h.weight", "norm.weight", "lm_head.weight"]}
    ]
    optimizer = method.build(groups, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    assert isinstance(optimizer, SCALE)
    (head(hidden(torch.randn(4, 8)) * gain).square().mean()).backward()
    optimizer.step()
    measured = {
        role: sum(t.numel() * t.element_size() for t in optimizer.state[p].values())
        for role, p in (("linear", hidden.weight), ("norm", gain), ("head", head.weight))
    }
    for role, p in (("linear", hidden.weight), ("norm", gain), ("head", head.weight)):
        assert measured[role] == method.state_bytes(role, p.numel(), 4), role
    assert method.state_bytes("embedding", 100, 4) == 0
