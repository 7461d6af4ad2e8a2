"""Registries carry behaviour: no code outside a registry compares its names, duplicates are refused, bit widths
are checked in one place (issue 19 item 1)."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_train.memory import TrainingSetup, estimate_memory, llama_shape
from lowrank_train.optim import GaLore
from lowrank_train.optim.registry import OptimizerMethod, get_optimizer_method, register_optimizer
from lowrank_train.optim.update_rules import UPDATE_RULES
from lowrank_train.projection import (
    PROJECTORS,
    ProjectorKind,
    get_projector,
    identity_basis,
    projector_names,
    register_projector,
)
from lowrank_train.quant import BASIS_BITS, TRAINED_WEIGHT_BITS, WEIGHT_BITS, check_bits
from lowrank_train.welore.allocation import STRATEGIES, AllocationStrategy, register_strategy, strategy_names

PACKAGE = Path(__file__).resolve().parents[2] / "lowrank_train"
REGISTRY_MODULES = {
    PACKAGE / "projection" / "projectors.py": projector_names,
    PACKAGE / "welore" / "allocation.py": strategy_names,
    PACKAGE / "optim" / "update_rules.py": lambda: tuple(UPDATE_RULES),
}


def _comparison_patterns(name: str) -> list[re.Pattern[str]]:
    """``x == "name"``, ``"name" != x``, ``x in ("a", "name")`` and the like, with either quote."""
    quoted = rf"""["']{re.escape(name)}["']"""
    return [
        re.compile(rf"(==|!=)\s*{quoted}"),
        re.compile(rf"{quoted}\s*(==|!=)"),
        re.compile(rf"\bin\s*[(\[{{][^)\]}}\n]*{quoted}"),
        re.compile(rf"{quoted}\s+(not\s+)?in\b"),
        re.compile(rf"case\s+{quoted}"),
    ]


def test_no_code_outside_a_registry_compares_a_registered_name():
    found = []
    for registry_module, names in REGISTRY_MODULES.items():
        patterns = [p for name in names() for p in _comparison_patterns(name)]
        for path in sorted(PACKAGE.rglob("*.py")):
            if path == registry_module:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if any(p.search(line) for p in patterns):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not found, "ask the registry entry instead of comparing its name:\n" + "\n".join(found)


def test_the_grep_finds_what_it_is_meant_to_find():
    patterns = _comparison_patterns("rsvd")
    for line in ('if kind == "rsvd":', "if 'rsvd' != p:", 'if p in ("svd", "rsvd"):', 'x = "rsvd" in names'):
        assert any(p.search(line) for p in patterns), line
    assert not any(p.search('projector: str = "rsvd"') for p in patterns)


def _restore(registry: dict, name: str, previous: object) -> None:
    if previous is None:
        registry.pop(name, None)
    else:
        registry[name] = previous


@pytest.mark.parametrize("which", ["projector", "strategy", "optimizer"])
def test_every_registry_refuses_a_duplicate_unless_replace(which):
    if which == "projector":
        entry, register, registry = ProjectorKind("svd", identity_basis), register_projector, PROJECTORS
    elif which == "strategy":
        entry, register, registry = AllocationStrategy("welore", None, objective="loss"), register_strategy, STRATEGIES
    else:
        old = get_optimizer_method("adamw")
        entry, register, registry = (
            OptimizerMethod("adamw", "x", "adamw", 32, False, old.build),
            register_optimizer,
            None,
        )
    name = entry.name
    if registry is not None:
        previous = registry[name]
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        register(entry)
    try:
        assert register(entry, replace=True) is entry
    finally:
        if registry is None:
            register_optimizer(old, replace=True)
        else:
            _restore(registry, name, previous)
    with pytest.raises(ValueError, match="takes an?"):
        register(object())


def test_base_optimizer_registry_refuses_a_duplicate_unless_replace():
    from lowrank_train.optim import BASE_OPTIMIZERS
    from lowrank_train.optim.bases import resolve_base
    from lowrank_train.optim.registry import register_base_optimizer

    with pytest.raises(ValueError, match="already registered.*replace=True"):
        register_base_optimizer("adamw", torch.optim.Adam)
    from lowrank_train.optim.bases import PER_PARAMETER_BASES

    previous, per_parameter = BASE_OPTIMIZERS["adamw"], set(PER_PARAMETER_BASES)
    try:
        register_base_optimizer("My_RMSprop", torch.optim.RMSprop, per_parameter=True)
        assert resolve_base("my_rmsprop") is torch.optim.RMSprop and "my_rmsprop" in PER_PARAMETER_BASES
        register_base_optimizer("adamw", "torch.optim:AdamW", replace=True)
        assert "adamw" not in PER_PARAMETER_BASES  # a replaced entry says again what its step does
    finally:
        BASE_OPTIMIZERS.pop("my_rmsprop", None)
        BASE_OPTIMIZERS["adamw"] = previous
        PER_PARAMETER_BASES.clear()
        PER_PARAMETER_BASES.update(per_parameter)
    with pytest.raises(ValueError, match="module:attribute"):
        register_base_optimizer("bad", "torch.optim.AdamW")


def test_qgalore_entries_and_presets_share_one_set_of_defaults():
    from lowrank_train.optim.presets import QGALORE_DEFAULTS, QGaLoreAdamW8bit

    for name in ("qgalore", "qgalore4bit"):
        method = get_optimizer_method(name)
        assert {key: getattr(method, key) for key in QGALORE_DEFAULTS} == QGALORE_DEFAULTS
    try:
        opt = QGaLoreAdamW8bit([{"params": [nn.Parameter(torch.randn(8, 16))], "rank": 2}], lr=1e-3)
    except ValueError as error:  # bitsandbytes missing
        pytest.skip(str(error))
    assert {key: opt.param_groups[0][key] for key in QGALORE_DEFAULTS} == QGALORE_DEFAULTS


def test_projector_entries_say_what_their_users_need():
    assert get_projector("identity").full_rank and not get_projector("svd").full_rank
    assert get_projector("identity").basis_rank((6, 10), 2) == 6
    assert get_projector("svd").basis_rank((6, 10), 2) == 2
    assert not get_projector("random").stores_basis and get_projector("svd").stores_basis
    assert get_projector("rsvd").build_options({"oversample": 3, "power_iters": 2, "rank": 4}) == {
        "oversample": 3,
        "power_iters": 2,
    }
    assert get_projector("svd").build_options({"oversample": 3}) == {}


def test_a_users_full_rank_projector_is_treated_as_identity_is(monkeypatch):
    """A new name with full_rank=True: GaLore takes rank >= min(m, n) and the update equals identity's."""
    kind = ProjectorKind("my-eye", identity_basis, stores_basis=False, uses_gradient=False, full_rank=True)
    monkeypatch.setitem(PROJECTORS, kind.name, kind)
    torch.manual_seed(0)
    grads = [torch.randn(4, 6) for _ in range(3)]
    results = []
    for projector in ("identity", "my-eye"):
        torch.manual_seed(1)
        w = nn.Parameter(torch.randn(4, 6))
        opt = GaLore([{"params": [w], "rank": 8, "projector": projector}], lr=1e-2)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach().clone())
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("projector", projector_names())
def test_the_estimator_accepts_every_registered_projector(projector):
    shape = llama_shape("20m")
    estimate = estimate_memory(shape, TrainingSetup(optimizer="galore", rank=16, projector=projector))
    kind = get_projector(projector)
    # A stored basis is state; a seeded one is kept in fp32 between refreshes (not state, still memory); the
    # identity projection has none.
    assert (estimate.projection_bases > 0) == (not kind.full_rank)
    if not kind.stores_basis and not kind.full_rank:
        per_block = sum(min(m, n) * 16 * 4 for m, n in shape.block_linear_shapes())
        assert estimate.projection_bases == per_block * shape.num_layers
    if kind.full_rank:  # full-size projected moments: as many as AdamW's for the block linears
        plain = estimate_memory(shape, TrainingSetup(optimizer="adamw"))
        assert estimate.details["states: block linears"] > plain.details["states: block linears"]


def test_the_estimator_uses_a_users_projector_entry(monkeypatch):
    kind = ProjectorKind("costly", identity_basis, workspace=lambda rows, cols, rank: 10**9)
    monkeypatch.setitem(PROJECTORS, kind.name, kind)
    estimate = estimate_memory(llama_shape("20m"), TrainingSetup(optimizer="galore", rank=16, projector="costly"))
    assert estimate.transient >= 4 * 10**9


# ----- bit widths: one check, one allowed set per use -------------------------------------------------------------
def test_check_bits_accepts_the_set_and_refuses_the_rest():
    assert check_bits(None, WEIGHT_BITS, name="weight_bits") is None
    assert check_bits(4, WEIGHT_BITS, name="weight_bits") == 4
    with pytest.raises(ValueError, match="weight_bits must be 4, 8 or None, got 3"):
        check_bits(3, WEIGHT_BITS, name="weight_bits")
    with pytest.raises(ValueError, match="must be 8, got None"):
        check_bits(None, TRAINED_WEIGHT_BITS, name="bits", optional=False)
    with pytest.raises(ValueError):
        check_bits(True, BASIS_BITS, name="proj_bits")


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_every_bits_site_uses_its_stated_set(bits):
    from lowrank_train.nn.meta_init import materialize_llama
    from lowrank_train.optim.options import check_group_option
    from lowrank_train.train import ConfigError, config_from_dict

    def accepts(make) -> bool:
        try:
            make()
        except (ValueError, ConfigError) as error:
            assert "bits" in str(error)
            return False
        except Exception:  # noqa: BLE001 - got past the bits check (e.g. no model config given)
            return True
        return True

    adamw = get_optimizer_method("adamw")
    method = lambda: OptimizerMethod("x", "x", "adamw", 32, True, adamw.build, weight_bits=bits)  # noqa: E731
    cli_weights = lambda: config_from_dict({"optimizer": {"name": "galore", "rank": 8, "weight_bits": bits}})  # noqa: E731
    cli_basis = lambda: config_from_dict({"optimizer": {"name": "galore", "rank": 8, "proj_bits": bits}})  # noqa: E731
    assert accepts(method) == (bits in TRAINED_WEIGHT_BITS)
    assert accepts(cli_weights) == (bits in TRAINED_WEIGHT_BITS)
    assert accepts(lambda: TrainingSetup(optimizer="galore", rank=8, weight_bits=bits)) == (bits in WEIGHT_BITS)
    assert accepts(lambda: materialize_llama(None, weight_bits=bits)) == (bits in WEIGHT_BITS)
    assert accepts(lambda: check_group_option("proj_bits", bits)) == (bits in BASIS_BITS)
    assert accepts(cli_basis) == (bits in BASIS_BITS)
    assert accepts(lambda: TrainingSetup(optimizer="galore", rank=8, proj_bits=bits)) == (bits in BASIS_BITS)
