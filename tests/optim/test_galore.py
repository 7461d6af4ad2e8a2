import io

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lowrank_train import GaLore, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, lowrank_param_groups
from lowrank_train.projection import svd_basis


def make_params(seed: int = 0, dtype=torch.float32, device="cpu") -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (40, 24), (16, 16), (16,)]
    return [nn.Parameter(torch.randn(*s, generator=g).to(device, dtype)) for s in shapes]


def fake_grads(step: int, params, seed: int = 100) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in params]


def run(opt, params, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        for p, grad in zip(params, fake_grads(t, params), strict=True):
            p.grad = grad
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_identity_projection_reproduces_torch_adamw(weight_decay, device):
    ours, ref = make_params(device=device), make_params(device=device)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt = GaLoreAdamW(
        [{"params": ours[:3], "rank": 16, "projector": "identity", "scale": 1.0}, {"params": ours[3:]}], **kw
    )
    ref_opt = torch.optim.AdamW([{"params": ref[:3]}, {"params": ref[3:]}], **kw)
    for t in range(20):
        for group in (ours, ref):
            for p, grad in zip(group, fake_grads(t, group), strict=True):
                p.grad = grad
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def accumulate_reference(base_cls, w0, grads, basis, scale, **kw):
    """Independent composition: the base optimizer on an r x n parameter Z, then W = W0 + scale * P Z."""
    z = nn.Parameter(torch.zeros(basis.shape[1], w0.shape[1]))
    opt = base_cls([z], **kw)
    out = []
    for g in grads:
        z.grad = basis.T @ g
        opt.step()
        out.append(w0 + scale * basis @ z.detach())
    return out


@pytest.mark.parametrize(
    "ours_cls, base_cls",
    [(GaLoreAdamW, torch.optim.AdamW), (GaLoreAdamW8bit, bnb.optim.AdamW8bit)],
    ids=["adamw", "adamw8bit"],
)
def test_lowrank_step_is_the_base_optimizer_on_projected_gradients(ours_cls, base_cls, device):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 1024).to(device))  # r x n = 8192 elements: bitsandbytes uses 8-bit states
    w0 = w.detach().clone()
    grads = [torch.randn(64, 1024).to(device) for _ in range(6)]
    rank, scale = 8, 0.5
    opt = ours_cls([{"params": [w], "rank": rank, "update_gap": 1000, "scale": scale}], lr=1e-2, weight_decay=0.0)
    basis = svd_basis(grads[0], rank)
    expected = accumulate_reference(base_cls, w0, grads, basis, scale, lr=1e-2, weight_decay=0.0)
    for g, want in zip(grads, expected, strict=True):
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), want, atol=2e-5, rtol=1e-5)
    if ours_cls is GaLoreAdamW8bit:
        (base_state,) = opt._base.state.values()
        assert base_state["state1"].dtype == torch.uint8  # moments really are 8-bit


def test_decoupled_weight_decay_acts_on_the_full_weight():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 32))
    before = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros(8, 32)
    w.grad[0, 0] = 1e-30  # a basis exists but the projected update is ~0
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.1 * 0.5), atol=1e-6, rtol=0)


def test_refreshes_happen_every_gap_and_are_counted():
    params = make_params()
    opt = GaLoreAdamW([{"params": params[:2], "rank": 4, "update_gap": 3}, {"params": params[2:]}], lr=1e-3)
    run(opt, params, 10)
    for stat in opt.refresh_stats():
        assert stat["refreshes"] == 4  # steps 0, 3, 6, 9
        assert stat["step"] == 10 and stat["last_refresh"] == 9


OPTIMIZERS = [
    (GaLoreAdamW, {}),
    (GaLoreAdamW8bit, {}),
    (GaLoreAdafactor, {}),
    (GaLoreAdamW, {"projector": "rsvd"}),
    (GaLoreAdamW, {"projector": "random"}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls, options", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_state_dict_round_trip_through_weights_only_load(cls, options, dtype, device):
    def build(params):
        groups = [{"params": params[:3], "rank": 4, "update_gap": 4, **options}, {"params": params[3:]}]
        return cls(groups, lr=1e-2, weight_decay=0.01)

    params = make_params(dtype=dtype, device=device)
    opt = build(params)
    run(opt, params, 6)  # stops mid-gap: last refresh at step 4
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True, map_location="cpu")  # load to the CPU, then move (issue 13)

    resumed = [nn.Parameter(t.to(device)) for t in saved["params"]]
    opt2 = build(resumed)
    opt2.load_state_dict(saved["opt"])
    stores_basis = options.get("projector", "svd") in ("svd", "rsvd")  # "random" regenerates it from the seed
    for p in resumed[:3]:
        state = opt2.state[p]
        assert state["step"].dtype == torch.int64 and int(state["step"]) == 6
        assert ("basis" in state) == stores_basis
    for p in resumed[:3] if stores_basis else []:
        assert opt2.state[p]["basis"].dtype == torch.float32  # not cast to the bf16 parameter dtype
    run(opt, params, 5, start=6)
    run(opt2, resumed, 5, start=6)
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)
    assert opt.refresh_stats() == opt2.refresh_stats()  # no extra refresh on resume
    assert [s["refreshes"] for s in opt2.refresh_stats()] == [3, 3, 3]  # steps 0, 4, 8


def test_generic_base_class_and_plain_groups():
    params = make_params()
    ref = make_params()
    opt = GaLore([{"params": params[:1], "rank": 4}, {"params": params[1:]}], base=torch.optim.SGD, lr=0.1)
    ref_opt = torch.optim.SGD(ref[1:], lr=0.1)
    grads = [fake_grads(t, params) for t in range(3)]
    # The projected weight (24 x 40, basis on its rows): SGD on P^T G by hand, W = W0 + scale * P Z, with P the
    # rank-4 SVD basis of the first gradient (update_gap 200: no refresh after step 0), scale 0.25 by default.
    basis = torch.linalg.svd(grads[0][0], full_matrices=False)[0][:, :4]
    expected, z = [], torch.zeros(4, 40)
    for step_grads in grads:
        z = z - 0.1 * (basis.T @ step_grads[0])
        expected.append(ref[0].detach() + 0.25 * basis @ z)
    for t, step_grads in enumerate(grads):
        for group in (params, ref):
            for p, grad in zip(group, step_grads, strict=True):
                p.grad = grad.clone()
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(params[0].detach(), expected[t], atol=1e-6, rtol=1e-5)
    assert not torch.equal(params[0], ref[0])  # it moved, and only within the basis' span
    for a, b in zip(params[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b)  # plain groups get the plain base update


def test_scheduler_drives_the_lowrank_learning_rate():
    params = make_params()
    opt = GaLoreAdamW([{"params": params[:2], "rank": 4}, {"params": params[2:]}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)
    before = [p.detach().clone() for p in params]
    run(opt, params, 1)
    sched.step()
    after_first = [p.detach().clone() for p in params]
    assert not torch.equal(before[0], after_first[0])
    run(opt, params, 1, start=1)  # lr is now 0: nothing moves
    for a, b in zip(params, after_first, strict=True):
        assert torch.equal(a, b)


def test_full_rank_fallback_gives_the_plain_update():
    params, ref = make_params(), make_params()
    opt = GaLoreAdamW([{"params": params[2:3], "rank": 16, "full_rank_fallback": True}], lr=1e-2)
    ref_opt = torch.optim.AdamW(ref[2:3], lr=1e-2)
    for t in range(3):
        params[2].grad = fake_grads(t, params)[2]
        ref[2].grad = fake_grads(t, ref)[2]
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(params[2], ref[2])
    assert not opt.is_lowrank(params[2])


BAD_GROUPS = [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -3}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"rank": 24}, r"rank 24 is not below min\(m, n\) = 24 for w \(shape \(24, 40\)\).*full_rank_fallback"),
    ({"rank": 4, "projector": "pca"}, r"projector must be a registered projector name, got 'pca'; registered: \["),
    ({"rank": 4, "scale": 0.0}, "scale must be a finite number > 0"),
    ({"rank": 4, "update_gap": 0}, "update_gap must be an integer >= 1"),
]


@pytest.mark.parametrize("options, message", BAD_GROUPS)
def test_bad_group_options_are_rejected(options, message):
    w = nn.Parameter(torch.randn(24, 40))
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW([{"params": [w], "param_names": ["w"], **options}])


def test_non_2d_tensor_in_a_lowrank_group_is_rejected():
    bias = nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match=r"only 2-D weights; norm.weight \(shape \(10,\)\) is 1-D"):
        GaLoreAdamW([{"params": [bias], "param_names": ["norm.weight"], "rank": 2}])


def test_unknown_base_optimizer_is_rejected():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="unknown base optimizer 'lion'"):
        GaLore([w], base="lion")
    with pytest.raises(ValueError, match="torch.optim.Optimizer subclass"):
        GaLore([w], base=dict)


def test_nan_gradient_does_not_poison_the_basis_and_nothing_moves():
    params = make_params()
    opt = GaLoreAdamW(
        [
            {"params": params[:2], "param_names": ["a", "b"], "rank": 4, "update_gap": 2},
            {"params": params[2:], "param_names": ["c", "d"]},
        ]
    )
    run(opt, params, 2)  # next step (2) is a refresh step
    snapshot = [p.detach().clone() for p in params]
    basis = opt.state[params[1]]["basis"].clone()
    grads = fake_grads(2, params)
    grads[1][0, 0] = float("nan")
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    with pytest.raises(ValueError, match=r"non-finite gradient.*b \(shape \(40, 24\)\)"):
        opt.step()
    assert torch.equal(opt.state[params[1]]["basis"], basis)
    for p, s in zip(params, snapshot, strict=True):
        assert torch.equal(p, s)


def test_rank_as_an_optimizer_default_is_rejected():
    with pytest.raises(ValueError, match="pass rank in a param group"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 4))], rank=2)


def test_two_line_replacement_trains_a_tiny_llama(tiny_llama):
    opt = GaLoreAdamW(lowrank_param_groups(tiny_llama, rank=8, update_gap=10), lr=3e-3)
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = tiny_llama(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_accumulation_between_refreshes_matches_summed_gradients_exactly():
    torch.manual_seed(1)
    w_sum = nn.Parameter(torch.randn(24, 40))
    w_acc = nn.Parameter(w_sum.detach().clone())
    first = torch.randn(24, 40)
    opts = [GaLoreAdamW([{"params": [w], "rank": 4, "update_gap": 100}], lr=1e-2) for w in (w_sum, w_acc)]
    for w, opt in zip((w_sum, w_acc), opts, strict=True):  # same first step builds the same basis
        w.grad = first.clone()
        opt.step()
    parts = [torch.randn(24, 40) for _ in range(3)]
    w_sum.grad = sum(parts)
    opts[0].step()
    for g in parts[:-1]:
        w_acc.grad = g.clone()
        opts[1].accumulate_grad(w_acc)
        assert w_acc.grad is None and opts[1].state[w_acc]["grad_accum"].shape == (4, 40)
    w_acc.grad = parts[-1].clone()
    opts[1].step()
    torch.testing.assert_close(w_acc, w_sum, atol=1e-6, rtol=1e-6)


def test_accumulate_rejects_plain_parameters():
    params = make_params()
    opt = GaLoreAdamW(
        [{"params": params[:1], "rank": 4, "param_names": ["w"]}, {"params": params[3:], "param_names": ["bias"]}]
    )
    params[3].grad = torch.ones(16)
    with pytest.raises(ValueError, match=r"bias \(shape \(16,\)\) is not projected"):
        opt.accumulate_grad(params[3])


def test_four_bit_moments_track_torchao_adamw4bit_on_projected_gradients():
    torchao_optim = pytest.importorskip("torchao.optim")
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 1024))  # r x n = 8192 elements: torchao quantizes the moments
    w0 = w.detach().clone()
    grads = [torch.randn(64, 1024) for _ in range(4)]
    opt = GaLore(
        [{"params": [w], "rank": 8, "update_gap": 1000, "scale": 0.5}], base="adamw4bit", lr=1e-2, weight_decay=0.0
    )
    basis = svd_basis(grads[0], 8)
    expected = accumulate_reference(torchao_optim.AdamW4bit, w0, grads, basis, 0.5, lr=1e-2, weight_decay=0.0)
    for g, want in zip(grads, expected, strict=True):
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), want, atol=2e-5, rtol=1e-5)
    (base_state,) = opt._base.state.values()
    assert type(base_state["exp_avg"]).__name__ == "OptimState4bit"


def test_a_group_whose_params_is_one_tensor_matches_a_list_of_it():
    # torch.optim accepts {"params": tensor}; the preset must not iterate the tensor's rows.
    lone, listed = make_params()[0], make_params()[0]
    options = {"rank": 4, "update_gap": 2, "scale": 0.5}
    opt_lone = GaLoreAdamW([{"params": lone, **options}], lr=1e-2)
    opt_listed = GaLoreAdamW([{"params": [listed], **options}], lr=1e-2)
    run(opt_lone, [lone], 3)
    run(opt_listed, [listed], 3)
    torch.testing.assert_close(lone, listed, rtol=0, atol=0)
    assert not torch.equal(lone, make_params()[0])


@pytest.mark.parametrize("update", ["galore", "apollo"])
def test_kept_random_basis_is_the_one_rebuilt_from_its_seed(update):
    """The "random" basis is kept between refreshes (issue 21 item 4): the same bits as a twin that rebuilds it from
    (seed, last refresh) at every step, across refreshes (gap 2), and a new basis after each refresh."""
    from lowrank_train.optim import GaLoreAdamW

    start = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [
        GaLoreAdamW([{"params": [w], "rank": 3, "update_gap": 2, "projector": "random", "update": update}], lr=1e-2)
        for w in weights
    ]
    kept = []
    for step in range(5):
        grad = torch.randn(12, 20, generator=torch.Generator().manual_seed(step))
        for w, opt in zip(weights, opts, strict=True):
            w.grad = grad.clone()
            opt.step()
        opts[1]._seeded_bases.clear()  # the twin forgets it: rebuilt from the seed next step
        kept.append(opts[0]._seeded_bases[weights[0]][1].clone())
        assert torch.equal(weights[0].detach(), weights[1].detach()), step
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2]) and torch.equal(kept[2], kept[3])
