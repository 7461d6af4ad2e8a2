"""The schema of GaLore group options: validation at the first call (issue 12 item 8, issue 15 item 1)."""

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_train.optim import (
    GaLore,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    QGaLoreAdamW4bit,
    QGaLoreAdamW8bit,
    lowrank_param_groups,
)
from lowrank_train.optim.galore import GALORE_DEFAULTS
from lowrank_train.optim.options import GROUP_OPTIONS


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))


PARAM_GROUP_ERRORS = [
    ({"rank": -4}, r"lowrank_param_groups: rank must be a positive integer, got -4"),
    ({"rank": 8, "projector": "svdd"}, r"projector must be .*got 'svdd' \(did you mean 'svd'\?\); registered: \["),
    ({"rank": 8, "updat_gap": 5}, r"unknown option 'updat_gap' \(did you mean 'update_gap'\?\)\. Known: GaLore's \["),
    ({"rank": 8, "scael": 0.5}, r"unknown option 'scael' \(did you mean 'scale'\?\)"),
    ({"rank": 8, "update_proj_gap": 5}, r"'update_proj_gap': galore-torch's update_proj_gap is called update_gap"),
    ({"rank": 8, "proj_type": "std"}, r"'proj_type': .*no equivalent here: GaLore always projects .* smaller side"),
    ({"rank": 8, "update_gap": 0}, r"update_gap must be an integer >= 1, got 0"),
    ({"rank": 8.0}, r"rank must be a positive integer, got 8.0"),
    ({"rank": True}, r"rank must be a positive integer, got True"),
    ({"rank": 8, "scale": float("nan")}, r"scale must be a finite number > 0, got nan"),
    ({"rank": 8, "proj_bits": 2}, r"proj_bits must be 4, 8 or None"),
    ({"rank": 8, "proj_bits": 4, "proj_group_size": 7}, r"proj_group_size must be even, got 7"),
    ({"rank": 8, "adaptive_refresh": "yes"}, r"adaptive_refresh must be True or False, got 'yes'"),
    ({"rank": 8, "adaptive_refresh": True, "refresh_threshold": 1.5}, r"refresh_threshold must be in \(0, 1\]"),
    ({"rank": 8, "adaptive_refresh": True, "max_update_gap": 10, "update_gap": 20}, r"max_update_gap must be"),
    ({"rank": 8, "lr": "fast"}, r"lr must be a finite number >= 0 .*got 'fast'"),
    ({"rank": 8, "totally_unrelated": 1}, r"unknown option 'totally_unrelated'\. Known: .*BASE_OPTIMIZERS"),
]


@pytest.mark.parametrize(("options", "message"), PARAM_GROUP_ERRORS)
def test_lowrank_param_groups_rejects_bad_options_at_once(options, message):
    with pytest.raises(ValueError, match=message):
        lowrank_param_groups(model(), **options)


@pytest.mark.parametrize(("options", "message"), PARAM_GROUP_ERRORS)
def test_the_same_options_in_a_group_are_rejected_by_the_optimizer(options, message):
    """A hand-written group (e.g. galore-torch style) gets the same checks, named as a group key."""
    net = model()
    message = message.replace("lowrank_param_groups", r"GaLoreAdamW param group 0").replace("option", "key")
    message = message.replace(r"\. Known: .*BASE_OPTIMIZERS", r"\. Known: ")
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW([{"params": [net[0].weight], **options}, {"params": [net[0].bias]}])


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    groups = lowrank_param_groups(
        model(), rank=np.int64(4), update_gap=np.int32(10), scale=np.float64(0.5), full_rank_fallback=np.bool_(True)
    )
    lowrank = groups[0]
    assert type(lowrank["rank"]) is int and type(lowrank["update_gap"]) is int and type(lowrank["scale"]) is float
    assert lowrank["full_rank_fallback"] is True
    opt = GaLoreAdamW([{**lowrank, "rank": np.int64(4)}, groups[1]], lr=np.float64(1e-3))
    assert type(opt.param_groups[0]["rank"]) is int
    net = [p for g in groups for p in g["params"]]
    for p in net:
        p.grad = torch.ones_like(p)
    opt.step()


def test_optimizer_keywords_are_checked_with_the_class_name():
    params = list(model().parameters())
    with pytest.raises(ValueError, match=r"GaLoreAdamW: lr must be a finite number >= 0 .*, got 'fast'"):
        GaLoreAdamW(params, lr="fast")
    with pytest.raises(ValueError, match=r"GaLoreAdamW: lr must be .*got inf"):
        GaLoreAdamW(params, lr=float("inf"))
    with pytest.raises(ValueError, match=r"GaLoreAdamW: betas must be a tuple of numbers in \[0, 1\)"):
        GaLoreAdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"GaLoreAdamW: unknown option 'updat_gap' \(did you mean 'update_gap'\?\)"):
        GaLoreAdamW(params, updat_gap=5)
    with pytest.raises(ValueError, match=r"GaLore: unknown option 'update_proj_gap': .* update_gap here"):
        GaLore(params, base="sgd", update_proj_gap=5)
    with pytest.raises(ValueError, match=r"GaLoreAdamW: weight_decay must be a finite number >= 0, got -0.1"):
        GaLoreAdamW(params, weight_decay=-0.1)


def test_base_optimizer_keys_and_bookkeeping_keys_are_allowed():
    net = model()
    group = {
        "params": [net[0].weight],
        "param_names": ["0.weight"],
        "name": "lowrank",
        "initial_lr": 1e-3,  # written by LR schedulers
        "rank": 4,
        "amsgrad": True,
        "maximize": False,
        "foreach": False,
    }
    bias = {"params": [net[0].bias], "param_names": ["0.bias"], "weight_decay": 0.0}
    opt = GaLoreAdamW([group, bias], lr=1e-3, fused=False)
    assert opt.param_groups[0]["amsgrad"] is True
    # Options of other bases: Adafactor's and bitsandbytes' own keys reach them.
    GaLoreAdafactor([{"params": [net[1].weight], "rank": 2, "clip_threshold": 2.0}])
    GaLoreAdamW8bit([{"params": [net[1].weight], "rank": 2, "t_alpha": None}])
    # lowrank_param_groups does not know the base yet: any registered base's option passes.
    assert lowrank_param_groups(model(), rank=4, relative_step=False, lr=1e-2)[0]["relative_step"] is False


def test_add_param_group_checks_before_anything_changes():
    net = model()
    opt = GaLoreAdamW([{"params": [net[0].weight], "rank": 4}])
    with pytest.raises(ValueError, match=r"GaLoreAdamW param group 1: unknown key 'scael' \(did you mean 'scale'\?\)"):
        opt.add_param_group({"params": [net[1].weight], "rank": 4, "scael": 0.5})
    with pytest.raises(ValueError, match=r"param group 1: rank 8 is not below min\(m, n\) = 8 for params\[0\]"):
        opt.add_param_group({"params": [net[1].weight], "rank": 8})
    assert len(opt.param_groups) == 1 and len(opt._base.param_groups) == 1
    opt.add_param_group({"params": [net[1].weight], "rank": 4})
    assert opt.is_lowrank(net[1].weight)


def test_rank_hint_names_the_fallback_option():
    with pytest.raises(ValueError, match=r"full_rank_fallback=True \(a keyword of lowrank_param_groups and of QGaL"):
        QGaLoreAdamW8bit(lowrank_param_groups(model(), rank=8))


def test_one_schema_everywhere():
    assert GALORE_DEFAULTS == {name: o.default for name, o in GROUP_OPTIONS.items() if name != "rank"}
    for preset in (GaLore, GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor, QGaLoreAdamW8bit, QGaLoreAdamW4bit):
        doc = preset.__doc__
        for name in GROUP_OPTIONS:
            assert f"``{name}``" in doc, (preset.__name__, name)
        assert "nonfinite" in doc


# ----- issue 21 item 5: the update rules' options, refused before any step ------------------------------------
def _apollo_groups(weight, bias, **lowrank):
    return [{"params": [weight], "rank": 2, **lowrank}, {"params": [bias]}]


RULE_ERRORS = [
    ("rank", {"rank": 8}, r"rank 8 is not below min\(m, n\) = 8 for params\[0\] \(shape \(8, 16\)\)"),
    ("rank", {"rank": 16}, r"rank 16 is not below min\(m, n\) = 8"),
    ("scale_type", {"scale_type": "row"}, r"scale_type must be one of \('channel', 'tensor'\), got 'row'"),
    ("norm_growth_limit", {"norm_growth_limit": 1.0}, r"norm_growth_limit must be .*a number > 1.*got 1\.0"),
    ("norm_growth_limit", {"norm_growth_limit": 0.5}, r"norm_growth_limit must be .*got 0\.5"),
]


@pytest.mark.parametrize(("option", "lowrank", "message"), RULE_ERRORS)
@pytest.mark.parametrize("cls", ["GaLore", "APOLLOAdamW", "FiraAdamW"])
def test_update_rule_options_are_refused_at_construction(cls, option, lowrank, message):
    """Each error names the group option, at construction: no step, no state, the weight untouched."""
    import lowrank_train.optim as optim

    weight, bias = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(16))
    before = weight.detach().clone()
    with pytest.raises(ValueError, match=rf"param group 0: {message}") as error:
        extra = {"update": "apollo", "projector": "random"} if cls == "GaLore" else {}
        getattr(optim, cls)(_apollo_groups(weight, bias, **lowrank), **extra)
    assert option in str(error.value)
    assert torch.equal(weight.detach(), before)


@pytest.mark.parametrize("rule", ["apollo", "fira"])
def test_an_update_rule_on_a_1d_parameter_is_refused(rule):
    weight, bias = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(16))
    with pytest.raises(ValueError, match=rf"update='{rule}' is a rule of low-rank groups .*1-D parameter"):
        GaLore([{"params": [weight], "rank": 2}, {"params": [bias], "update": rule}])
    with pytest.raises(ValueError, match=r"take only 2-D weights; params\[0\] \(shape \(16,\)\) is 1-D"):
        GaLore([{"params": [bias], "rank": 2, "update": rule}])
    # The preset's default rule reaches only low-rank groups: a plain 1-D group is fine.
    from lowrank_train.optim import APOLLOAdamW

    APOLLOAdamW([{"params": [weight], "rank": 2}, {"params": [bias]}])


def test_update_rule_options_are_refused_by_lowrank_param_groups():
    with pytest.raises(ValueError, match=r"lowrank_param_groups: scale_type must be one of"):
        lowrank_param_groups(model(), rank=2, update="apollo", scale_type="rows")
    with pytest.raises(ValueError, match=r"lowrank_param_groups: norm_growth_limit must be"):
        lowrank_param_groups(model(), rank=2, update="apollo", norm_growth_limit=1)
