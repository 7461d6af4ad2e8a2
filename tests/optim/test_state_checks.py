"""load_state_dict checks every saved tensor before anything changes (issue 12 item 1).

The cases that used to corrupt the heap (a fused AdamW or a layer-wise engine stepping moments of another width)
run in a subprocess: a regression then fails the test instead of killing pytest.
"""

import copy
import io
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lowrank_train.optim import (
    GaLore,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    LayerwiseOptimizer,
    QGaLoreAdamW8bit,
    lowrank_param_groups,
)


def make_model(width: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 8))


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


def galore(model: nn.Module, cls=GaLoreAdamW, rank: int = 4, **kwargs) -> torch.optim.Optimizer:
    return cls(lowrank_param_groups(model, rank=rank, update_gap=2, target_modules=["0", "2"], **kwargs), lr=1e-2)


CRASH_SCRIPT = textwrap.dedent(
    """
    import io, sys
    import torch
    from torch import nn
    from lowrank_train.optim import GaLoreAdamW, LayerwiseOptimizer, lowrank_param_groups

    def model(width):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 8))

    def build(case, m):
        if case == "galore-fused":
            groups = lowrank_param_groups(m, rank=4, update_gap=2, target_modules=["0", "2"])
            return GaLoreAdamW(groups, lr=1e-2, fused=True)
        if case == "layerwise-galore":
            groups = lowrank_param_groups(m, rank=4, update_gap=2, target_modules=["0", "2"])
            return LayerwiseOptimizer(groups, lambda g: GaLoreAdamW(g, lr=1e-2, fused=True))
        return LayerwiseOptimizer(m, lambda g: torch.optim.AdamW(g, lr=1e-2, fused=True))

    def train(m, opt, steps):
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            nn.functional.mse_loss(m(torch.randn(8, 16, generator=g)), torch.randn(8, 8, generator=g)).backward()
            if not isinstance(opt, LayerwiseOptimizer):
                opt.step()
                opt.zero_grad()

    for case in sys.argv[1:]:
        small = model(32)
        opt = build(case, small)
        train(small, opt, 3)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        wide = model(48)
        opt = build(case, wide)
        try:
            opt.load_state_dict(state)
        except ValueError as err:
            print(f"{case} REFUSED:", err, flush=True)
        train(wide, opt, 3)  # the refused state left the optimizer usable
        print(f"{case} FINITE:", all(bool(p.isfinite().all()) for p in wide.parameters()), flush=True)
    """
)


CRASH_CASES = {  # case -> what the refusal must say
    "galore-fused": r"0\.weight \(shape \(48, 16\)\).*'exp_avg' has shape \(4, 32\).*needs shape \(4, 48\)",
    "layerwise-galore": r"0\.weight \(shape \(48, 16\)\).*'exp_avg' has shape \(4, 32\).*needs shape \(4, 48\)",
    "layerwise-adamw": r"0\.weight \(shape \(48, 16\)\).*'exp_avg' has shape \(32, 16\).*needs shape \(48, 16\)",
}


def test_state_of_another_width_is_refused_in_a_subprocess(tmp_path):
    """Before the checks, stepping these loaded states corrupted the heap (SIGSEGV): one process runs all cases."""
    script = tmp_path / "load_wide.py"
    script.write_text(CRASH_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), *CRASH_CASES]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout[-2000:]} {done.stderr[-3000:]}"
    lines = done.stdout.splitlines()
    for case, message in CRASH_CASES.items():
        refused = [line for line in lines if line.startswith(f"{case} REFUSED:")]
        assert refused and re.search(message, refused[0]), (case, done.stdout)
        assert f"{case} FINITE: True" in lines, (case, done.stdout)


def test_other_rank_projector_and_bits_are_refused():
    model = make_model()
    opt = galore(model, rank=2)
    train(model, opt, 3)
    state = saved(opt)
    with pytest.raises(ValueError, match=r"param group 0 was saved with rank=2 and has rank=3 here"):
        galore(make_model(), rank=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved with projector='svd' and has projector='rsvd'"):
        galore(make_model(), rank=2, projector="rsvd").load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved with proj_bits=None and has proj_bits=4"):
        galore(make_model(), rank=2, proj_bits=4, proj_group_size=8).load_state_dict(state)


def test_plain_adamw_state_into_galore_says_so():
    model = make_model()
    plain = torch.optim.AdamW(model.parameters())
    train(model, plain, 1)
    with pytest.raises(ValueError, match=r"no 'base' entry, so it was not saved by a GaLore optimizer"):
        galore(make_model()).load_state_dict(saved(plain))
    with pytest.raises(ValueError, match=r"has \['param_groups', 'state'\], not the 'inner', 'layerwise'"):
        LayerwiseOptimizer(make_model(), lambda g: torch.optim.AdamW(g)).load_state_dict(saved(plain))


def test_a_refused_load_changes_nothing():
    model, other = make_model(), make_model(width=40)
    opt, wrong = galore(model), galore(other)
    train(model, opt, 3)
    train(other, wrong, 3)
    twin_model = copy.deepcopy(model)
    twin = galore(twin_model)
    twin.load_state_dict(saved(opt))
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"0\.weight \(shape \(32, 16\)\)"):
        opt.load_state_dict(saved(wrong))
    assert torch.equal(torch.get_rng_state(), rng)
    train(model, opt, 3)
    train(twin_model, twin, 3)
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("cls", "entry"),
    [(GaLoreAdamW8bit, "state1"), (GaLoreAdafactor, "exp_avg_sq_col"), (QGaLoreAdamW8bit, "state1")],
    ids=["bnb-8bit", "adafactor", "qgalore"],
)
def test_every_base_optimizer_is_checked_by_its_own_reference(cls, entry):
    options = {"proj_group_size": 8} if cls is QGaLoreAdamW8bit else {}
    small, large = make_model(32), make_model(2048 if cls is GaLoreAdamW8bit else 48)  # 8-bit needs >= 4096 elems
    for model in (small, large):
        opt = galore(model, cls=cls, **options)
        train(model, opt, 3)
        if model is small:
            state = saved(opt)
    with pytest.raises(ValueError, match=rf"0\.weight .*{entry}"):
        opt.load_state_dict(state)


def test_tampered_basis_and_moments_are_named():
    model = make_model()
    opt = galore(model)
    train(model, opt, 3)
    state = saved(opt)
    state["state"][0]["basis"] = state["state"][0]["basis"][:, :3]
    with pytest.raises(ValueError, match=r"0\.weight \(shape \(32, 16\)\): the saved GaLore state entry 'basis' has "
                       r"shape \(16, 3\), this optimizer needs shape \(16, 4\)"):  # fmt: skip
        galore(make_model()).load_state_dict(state)
    state = saved(opt)
    state["base"]["state"][0]["exp_avg_sq"] = torch.zeros(4, 31)
    with pytest.raises(ValueError, match=r"'exp_avg_sq' has shape \(4, 31\), this optimizer needs shape \(4, 32\)"):
        galore(make_model()).load_state_dict(state)
    state = saved(opt)
    del state["state"][0]["basis"]
    with pytest.raises(ValueError, match=r"no 'basis' entry although a basis was built"):
        galore(make_model()).load_state_dict(state)
    quantized = galore(model, cls=QGaLoreAdamW8bit, proj_group_size=8)
    train(model, quantized, 1)
    state = saved(quantized)
    state["state"][0]["basis_codes"] = state["state"][0]["basis_codes"][:-1]
    with pytest.raises(ValueError, match=r"'basis_codes' has shape \(31,\), this optimizer needs shape \(32,\)"):
        galore(make_model(), cls=QGaLoreAdamW8bit, proj_group_size=8).load_state_dict(state)


def test_layerwise_checks_every_inner_state_before_loading_any():
    def make(groups):
        return GaLoreAdamW(groups, lr=1e-2)

    model, other = make_model(), make_model(width=40)
    opt = LayerwiseOptimizer(lowrank_param_groups(model, rank=4, target_modules=["0", "2"]), make)
    wrong = LayerwiseOptimizer(lowrank_param_groups(other, rank=4, target_modules=["0", "2"]), make)
    train(model, opt, 2, layerwise=True)
    train(other, wrong, 2, layerwise=True)
    before = saved(opt)
    bad = saved(opt)
    bad["inner"][1] = saved(wrong)["inner"][1]  # the second parameter only (2.weight) is of another width
    with pytest.raises(ValueError, match=r"2\.weight \(shape \(8, 32\)\).*'exp_avg' has shape \(4, 40\)"):
        opt.load_state_dict(bad)
    after = saved(opt)
    for inner_before, inner_after in zip(before["inner"], after["inner"], strict=True):
        for index, state in inner_before["base"]["state"].items():
            for key, value in state.items():
                assert torch.equal(inner_after["base"]["state"][index][key], value)


def test_old_checkpoints_without_skip_counters_still_load():
    model = make_model()
    opt = galore(model)
    train(model, opt, 2)
    state = saved(opt)
    del state["galore"]
    fresh = galore(make_model())
    fresh.load_state_dict(state)
    assert fresh.skipped_steps == 0 and isinstance(fresh, GaLore)
