"""Update rules (issue 21): GaLore, APOLLO, Fira against brute-force references written here, the norm-growth
limiter against its definition, state round trips, and APOLLO against the peer implementation apollo-torch."""

import io
import math

import pytest
import torch

from lowrank_train.optim import (
    UPDATE_RULES,
    APOLLOAdamW,
    APOLLOMini,
    FiraAdamW,
    GaLore,
    GaLoreAdamW,
    UpdateRule,
    get_update_rule,
    register_update_rule,
)
from lowrank_train.optim.functional import basis_generator
from lowrank_train.optim.update_rules import galore_update, limit_norm_growth
from lowrank_train.projection import orient, project_back, project_gradient, random_basis, svd_basis

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.999), 1e-8
SHAPES = [(8, 20), (20, 8)]  # both orientations: the channel is the non-projected side (n, then m)


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Growing gradients make the norm-growth limiter bite on some steps.
    return [torch.randn(shape, generator=g) * (1 + 0.5 * t) for t in range(steps)]


def _run(optimizer, weight, grads):
    for grad in grads:
        weight.grad = grad.clone().to(weight.dtype)
        optimizer.step()
    return weight


class _Adam:
    """torch AdamW's math on the projected gradient (no decay: GaLore decays the full weight)."""

    def __init__(self):
        self.m = self.v = None
        self.t = 0

    def update(self, r):
        self.t += 1
        self.m = (1 - BETAS[0]) * r if self.m is None else BETAS[0] * self.m + (1 - BETAS[0]) * r
        self.v = (1 - BETAS[1]) * r * r if self.v is None else BETAS[1] * self.v + (1 - BETAS[1]) * r * r
        m_hat = self.m / (1 - BETAS[0] ** self.t)
        v_hat = self.v / (1 - BETAS[1] ** self.t)
        return -LR * m_hat / (v_hat.sqrt() + EPS)


def _ratio(top, bottom, scale_type):
    dim = 0 if scale_type == "channel" else None
    if dim is None:
        return top.norm() / (bottom.norm() + 1e-8)
    return top.norm(dim=0, keepdim=True) / (bottom.norm(dim=0, keepdim=True) + 1e-8)


def _limit(u, prev, gamma):
    """||u_t|| / lr > gamma ||u_{t-1}|| / lr: rescale u_t to gamma ||u_{t-1}||."""
    norm = float(u.norm()) / LR
    if prev is not None and norm > gamma * (prev + 1e-8):
        u, norm = u * gamma * (prev + 1e-8) / norm, gamma * (prev + 1e-8)
    return u, norm


def _apollo_reference(w0, grads, rank, scale, scale_type, gamma, proj_dtype=None):
    rows = min(w0.shape)
    p = random_basis(torch.zeros(rows, max(w0.shape)), rank, basis_generator(0, 0, torch.device("cpu")))
    adam, w, prev = _Adam(), w0.clone(), None
    for g in grads:
        go = orient(g)
        if proj_dtype is None:
            r = p.mT @ go
        else:  # G and P rounded for the product only, R rounded once and back in fp32
            r = (p.to(proj_dtype).float().mT @ go.to(proj_dtype).float()).to(proj_dtype).float()
        r_tilde = adam.update(r)
        s = _ratio(r_tilde, r * math.sqrt(rows / rank), scale_type)  # the paper's N(0, 1/r) normalisation
        u, prev = _limit(-go * s, prev, gamma)
        u = u if w0.shape[0] <= w0.shape[1] else u.mT
        w = w * (1 - LR * WD) + scale * u
    return w


def _fira_reference(w0, grads, rank, scale, gamma):
    adam, w, prev, p = _Adam(), w0.clone(), None, None
    for g in grads:
        go = orient(g)
        p = svd_basis(go, rank) if p is None else p
        r = p.mT @ go
        r_tilde = adam.update(r)
        residual, prev = _limit(-(go - p @ r) * _ratio(r_tilde, r, "channel"), prev, gamma)
        u = p @ r_tilde + residual
        u = u if w0.shape[0] <= w0.shape[1] else u.mT
        w = w * (1 - LR * WD) + scale * u
    return w


def _weight(shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype))


def _group(weight, rank, **options):
    return [{"params": [weight], "rank": rank, "update_gap": 1000, **options}]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("cls", "rank", "scale", "scale_type"),
    [(APOLLOAdamW, 3, 1.0, "channel"), (APOLLOMini, 1, math.sqrt(128), "tensor")],
)
def test_apollo_matches_its_brute_force_reference(shape, cls, rank, scale, scale_type):
    weight = _weight(shape)
    w0, grads = weight.detach().clone(), _grads(shape, 6)
    opt = cls(_group(weight, rank), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    _run(opt, weight, grads)
    expected = _apollo_reference(w0, grads, rank, scale, scale_type, 1.01)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_bf16_projection_rounds_the_projection_and_nothing_else(shape):
    weight = _weight(shape)
    w0, grads = weight.detach().clone(), _grads(shape, 6)
    opt = APOLLOAdamW(_group(weight, 3, proj_dtype="bf16"), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    assert opt.param_groups[0]["proj_dtype"] == "bfloat16"
    _run(opt, weight, grads)
    expected = _apollo_reference(w0, grads, 3, 1.0, "channel", 1.01, proj_dtype=torch.bfloat16)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)
    exact = _apollo_reference(w0, grads, 3, 1.0, "channel", 1.01)
    moved, drift = (exact - w0).norm(), (weight.detach() - exact).norm()
    assert 0 < drift < 0.02 * moved  # the option is in effect, and it moves the weights about as fp32 does
    assert opt._base.state[opt._shadows[weight]]["exp_avg"].dtype == torch.float32  # R back in fp32
    with pytest.raises(ValueError, match="proj_dtype"):
        APOLLOAdamW(_group(_weight(shape), 3, proj_dtype="float16"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [1.01, None])
def test_fira_matches_its_brute_force_reference(shape, gamma):
    weight = _weight(shape)
    w0, grads = weight.detach().clone(), _grads(shape, 6)
    limit = float("inf") if gamma is None else gamma
    opt = FiraAdamW(_group(weight, 3, norm_growth_limit=limit), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    _run(opt, weight, grads)
    expected = _fira_reference(w0, grads, 3, 0.25, gamma if gamma is not None else math.inf)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_galore_rule_is_todays_update_bit_for_bit(shape):
    """The rule is project_back itself, and the optimizer equals a zero-started shadow stepped by torch AdamW."""
    g = torch.Generator().manual_seed(3)
    basis, low_update = torch.randn(min(shape), 4, generator=g), torch.randn(4, max(shape), generator=g)
    update, state = galore_update(
        None, low_update, low_update, basis, {}, weight_shape=torch.Size(shape), lr=LR, scale_type="channel",
        norm_growth_limit=None,
    )  # fmt: skip
    assert torch.equal(update, project_back(low_update, basis, torch.Size(shape))) and state == {}

    weight = _weight(shape)
    reference, grads = weight.detach().clone(), _grads(shape, 4)
    opt = GaLoreAdamW(_group(weight, 3), lr=LR, weight_decay=WD)
    shadow = torch.nn.Parameter(torch.zeros(3, max(shape)))
    adam = torch.optim.AdamW([shadow], lr=LR, weight_decay=WD, fused=True)
    p = svd_basis(orient(grads[0]), 3)
    for grad in grads:
        weight.grad = grad.clone()
        opt.step()
        shadow.data.zero_()
        shadow.grad = project_gradient(grad, p)
        adam.step()
        reference.mul_(1 - LR * WD).add_(project_back(shadow.data, p, weight.shape), alpha=0.25)
    assert torch.equal(weight.detach(), reference)
    assert "update_norm" not in opt.state[weight]  # no limiter by default for GaLore


def test_limiter_oracle():
    update = torch.full((2, 2), 1.0)  # norm 2
    # lr 0.5: the lr-free norm is 4; previous 2 allows 2.02 at most.
    limited, norm = limit_norm_growth(update, torch.tensor(2.0), 1.01, 0.5)
    torch.testing.assert_close(norm, torch.tensor(2.02 + 1.01e-8))
    torch.testing.assert_close(limited.norm() / 0.5, norm)
    kept, norm = limit_norm_growth(update, torch.tensor(10.0), 1.01, 0.5)  # shrinking: untouched
    assert torch.equal(kept, update) and float(norm) == 4.0
    first, norm = limit_norm_growth(update, None, 1.01, 0.5)
    assert torch.equal(first, update) and float(norm) == 4.0


def test_registry_and_options_are_checked_where_they_enter():
    assert {"galore", "apollo", "fira"} <= set(UPDATE_RULES)
    assert get_update_rule("apollo").needs_full_gradient and not get_update_rule("galore").needs_full_gradient
    with pytest.raises(ValueError, match="already registered"):
        register_update_rule(UpdateRule("apollo", galore_update))
    previous = UPDATE_RULES["apollo"]
    try:
        register_update_rule(UpdateRule("apollo", galore_update), replace=True)
    finally:
        register_update_rule(previous, replace=True)
    weight = _weight((8, 20))
    with pytest.raises(ValueError, match="did you mean 'apollo'"):
        GaLore(_group(weight, 2, update="apolo"))
    with pytest.raises(ValueError, match="scale_type must be one of"):
        GaLore(_group(weight, 2, scale_type="row"))
    with pytest.raises(ValueError, match="norm_growth_limit must be"):
        GaLore(_group(weight, 2), norm_growth_limit=0.9)
    with pytest.raises(ValueError, match="this optimizer is update='apollo'"):
        APOLLOAdamW(_group(weight, 2, update="fira"))


def test_projected_accumulation_is_refused_for_full_gradient_rules():
    weight = _weight((8, 20))
    opt = APOLLOAdamW(_group(weight, 2), lr=LR)
    weight.grad = torch.ones_like(weight)
    with pytest.raises(ValueError, match="raw full gradient"):
        opt.accumulate_grad(weight)


def test_presets_fix_the_method_options():
    weight = _weight((8, 20))
    group = {"params": [weight], "rank": 4, "projector": "svd", "scale": 0.25}  # as lowrank_param_groups writes
    mini = APOLLOMini([group]).param_groups[0]
    assert (mini["rank"], mini["projector"], mini["scale_type"], mini["scale"]) == (1, "random", "tensor", 128**0.5)
    assert APOLLOAdamW([dict(group)], scale=2.0).param_groups[0]["scale"] == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [APOLLOAdamW, APOLLOMini, FiraAdamW])
def test_state_round_trip(cls, dtype):
    """N steps, save, load with weights_only=True, continue both copies: same numbers; update_norm stays fp32."""
    grads = _grads((8, 20), 8)
    weight = _weight((8, 20), dtype)
    opt = cls(_group(weight, 2), lr=LR, weight_decay=WD)
    _run(opt, weight, grads[:4])
    buffer = io.BytesIO()
    torch.save({"weight": weight.detach().clone(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = torch.nn.Parameter(saved["weight"])
    twin_opt = cls(_group(twin, 2), lr=LR, weight_decay=WD)
    twin_opt.load_state_dict(saved["opt"])
    assert twin_opt.state[twin]["update_norm"].dtype == torch.float32
    _run(opt, weight, grads[4:])
    _run(twin_opt, twin, grads[4:])
    assert torch.equal(weight.detach(), twin.detach())
    assert torch.equal(opt.state[weight]["update_norm"], twin_opt.state[twin]["update_norm"])


# ----- the peer: apollo-torch ---------------------------------------------------------------------------------
def _peer_run(monkeypatch, shape, grads, rank, scale_type, alpha, betas, eps, limiter):
    apollo_torch = pytest.importorskip("apollo_torch")
    from apollo_torch import random_projector

    rows = min(shape)
    raw = torch.randn(rows, rank, generator=basis_generator(0, 0, torch.device("cpu")))  # our basis * sqrt(rows)

    def shared_gaussian(size, seed, device=None, dtype=torch.float32):
        del seed, device
        return (raw if tuple(size) == (rows, rank) else raw.mT).to(dtype).clone()  # "left" or "right"

    monkeypatch.setattr(random_projector, "stable_randn", shared_gaussian)
    peer_weight = _weight(shape)
    group = {
        "params": [peer_weight], "rank": rank, "proj": "random", "proj_type": "std", "update_proj_gap": 1000,
        "scale": alpha**2, "scale_type": scale_type,
    }  # fmt: skip
    peer = apollo_torch.APOLLOAdamW([group], lr=LR, betas=betas, eps=eps, weight_decay=0.0, disable_nl=not limiter)
    _run(peer, peer_weight, grads)

    weight = _weight(shape)
    ours = APOLLOAdamW(
        _group(weight, rank, scale_type=scale_type, norm_growth_limit=1.01 if limiter else math.inf),
        lr=LR, betas=betas, eps=eps, weight_decay=0.0, scale=alpha,
    )  # fmt: skip
    _run(ours, weight, grads)
    return weight.detach(), peer_weight.detach()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("rank", "scale_type", "alpha"), [(3, "channel", 1.0), (1, "tensor", math.sqrt(128))])
def test_apollo_matches_apollo_torch_with_a_shared_projection(monkeypatch, shape, rank, scale_type, alpha):
    """Same Gaussian for both (apollo-torch's N(0, 1/r) is sqrt(rows / r) times our basis). eps 0: apollo-torch's
    eps sits outside torch AdamW's bias correction; without the limiter the two are the same update."""
    grads = _grads(shape, 6)
    ours, peer = _peer_run(monkeypatch, shape, grads, rank, scale_type, alpha, BETAS, 0.0, limiter=False)
    torch.testing.assert_close(ours, peer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_apollo_limiter_matches_apollo_torch(monkeypatch, shape):
    """apollo-torch limits the update before bias correction, we after (torch AdamW's R~); betas 0 make the
    corrections 1, so the limiters (gamma 1.01, lr-free norms) must agree exactly."""
    grads = _grads(shape, 6)
    ours, peer = _peer_run(monkeypatch, shape, grads, 3, "channel", 1.0, (0.0, 0.0), 0.0, limiter=True)
    torch.testing.assert_close(ours, peer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proj_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("cls", [APOLLOAdamW, APOLLOMini, FiraAdamW])
def test_layerwise_engine_steps_like_the_whole_model_optimizer(cls, accumulation, proj_dtype):
    """The engine's per-step sync of its groups must not undo what the preset wrote (projector, scale, rank).

    With accumulation the raw gradient the rule reads at the step is summed in ``.grad`` (no projected
    accumulator), as in the whole-model loop; a refresh at step 2 (update_gap 2) is built from the summed gradient.
    """
    from torch import nn

    from lowrank_train.optim import LayerwiseOptimizer, lowrank_param_groups

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    g = torch.Generator().manual_seed(2)
    data = [[torch.randn(4, 16, generator=g) for _ in range(accumulation)] for _ in range(3)]
    whole, layerwise = model(), model()
    options = {} if proj_dtype is None else {"proj_dtype": proj_dtype}
    opt = cls(lowrank_param_groups(whole, rank=4, update_gap=2, **options), lr=LR)
    engine = LayerwiseOptimizer(
        lowrank_param_groups(layerwise, rank=4, update_gap=2, **options),
        lambda groups: cls(groups, lr=LR),
        accumulation_steps=accumulation,
    )
    assert not any(engine.is_lowrank(p) for p in layerwise.parameters())  # nothing accumulates projected
    for step in data:
        for x in step:
            (whole(x).square().sum() / accumulation).backward()
        opt.step()
        opt.zero_grad()
        for x in step:
            (layerwise(x).square().sum() / accumulation).backward()
        assert all(p.grad is None for p in layerwise.parameters())
    assert engine.steps == 3
    for p, q in zip(whole.parameters(), layerwise.parameters(), strict=True):
        assert torch.equal(p, q)
    engine.remove_hooks()


def test_run_config_takes_layerwise_accumulation_for_full_gradient_rules():
    """The engine keeps a raw-gradient rule's weights in .grad over micro-batches, so the config no longer refuses."""
    from lowrank_train.train import config_from_dict

    for name in ("apollo", "fira", "galore"):
        config = config_from_dict({"optimizer": {"name": name, "layerwise": True}, "data": {"grad_accum": 2}})
        assert config.optimizer.layerwise and config.data.grad_accum == 2


def test_qapollo_mini_writes_int8_weights_and_tracks_the_float_update():
    """Q-APOLLO-Mini: the INT8 write-back (stochastic rounding) follows APOLLO-Mini on the same float start."""
    import copy

    from torch import nn

    from lowrank_train.nn import dequantize_model, quantize_model
    from lowrank_train.optim import QAPOLLOMini, lowrank_param_groups

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(64, 128, bias=False)

        def forward(self, x):
            return self.up(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block()])

        def forward(self, x):
            return self.layers[0](x)

    torch.manual_seed(0)
    quantized = quantize_model(Model())
    floating = dequantize_model(copy.deepcopy(quantized))
    start = floating.layers[0].up.weight.detach().clone()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    q_opt = QAPOLLOMini(lowrank_param_groups(quantized, rank=1, target_modules=None), lr=1e-3, weight_decay=0.0)
    f_opt = APOLLOMini(lowrank_param_groups(floating, rank=1, target_modules=None), lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        for model, opt in ((quantized, q_opt), (floating, f_opt)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    moved = dequantize_model(copy.deepcopy(quantized)).layers[0].up.weight.detach()
    float_step = floating.layers[0].up.weight.detach() - start
    assert float_step.norm() > 0 and (moved - start).norm() > 0
    cosine = torch.nn.functional.cosine_similarity((moved - start).flatten(), float_step.flatten(), dim=0)
    assert cosine > 0.9
