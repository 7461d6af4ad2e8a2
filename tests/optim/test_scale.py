"""SCALE (arXiv 2506.16659, issue 21): against a hand-written dense reference of the paper's update, exact resume
through ``weights_only``, the registry / config / estimator entries, and a tiny run that learns."""

import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_train.optim import SCALE, get_optimizer_method, scale_param_groups
from lowrank_train.optim.scale import column_normalize

_conftest = importlib.util.spec_from_file_location("train_conftest", Path(__file__).parents[1] / "train/conftest.py")
_train = importlib.util.module_from_spec(_conftest)
_conftest.loader.exec_module(_train)

LR, WD, BETA = 1e-2, 0.1, 0.9
BETAS, EPS = (0.9, 0.999), 1e-8
NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]
SHAPES = [(12, 6), (10, 6), (6,), (12, 6)]


def _params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES]


def _grads(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=generator) for s in SHAPES] for _ in range(steps)]


def _run(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.to(p.dtype)
        optimizer.step()


def _scale(params, **kwargs):
    groups = scale_param_groups([{"params": params, "param_names": NAMES}])
    return SCALE(groups, lr=LR, momentum=BETA, weight_decay=WD, betas=BETAS, eps=EPS, **kwargs)


def _paper_c(matrix, fan_in_dim):
    """The paper's C(M): each output unit's slice over its inputs divided by its L2 norm, times sqrt(fan-in) (the
    authors' RMS scaling, which only rescales the learning rate per shape)."""
    k = matrix.shape[fan_in_dim]
    norms = torch.sqrt(sum(matrix.select(fan_in_dim, j) ** 2 for j in range(k)))  # one norm per output unit
    norms = norms.unsqueeze(fan_in_dim)
    return matrix / (norms / math.sqrt(k))


def _reference(grads):
    """Dense, written-out: embedding (norm over the vocabulary), hidden matrix (norm over inputs) without state,
    head with m = beta m + (1 - beta) g, the 1-D gain with AdamW; decoupled decay first."""
    weights = [p.detach().clone().double() for p in _params()]
    momentum = torch.zeros(SHAPES[3], dtype=torch.float64)
    m1, m2 = torch.zeros(SHAPES[2], dtype=torch.float64), torch.zeros(SHAPES[2], dtype=torch.float64)
    for t, (g_emb, g_mat, g_norm, g_head) in enumerate(grads, start=1):
        g_emb, g_mat, g_norm, g_head = (g.double() for g in (g_emb, g_mat, g_norm, g_head))
        weights = [w * (1 - LR * WD) for w in weights]
        weights[0] = weights[0] - LR * _paper_c(g_emb, 0)
        weights[1] = weights[1] - LR * _paper_c(g_mat, 1)
        momentum = BETA * momentum + (1 - BETA) * g_head
        weights[3] = weights[3] - LR * _paper_c(momentum, 1)
        m1 = BETAS[0] * m1 + (1 - BETAS[0]) * g_norm
        m2 = BETAS[1] * m2 + (1 - BETAS[1]) * g_norm**2
        m_hat, v_hat = m1 / (1 - BETAS[0] ** t), m2 / (1 - BETAS[1] ** t)
        weights[2] = weights[2] - LR * m_hat / (v_hat.sqrt() + EPS)
    return weights


def test_scale_matches_the_dense_reference_of_the_paper():
    grads = _grads(6)
    params = _params()
    opt = _scale(params)
    _run(opt, params, grads)
    for name, got, want in zip(NAMES, params, _reference(grads), strict=True):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6, msg=name)


def test_only_the_head_keeps_state_and_1d_gains_take_torch_adamw():
    grads = _grads(3)
    params = _params()
    opt = _scale(params)
    _run(opt, params, grads)
    assert opt.state[params[0]] == {} and opt.state[params[1]] == {}
    assert set(opt.state[params[3]]) == {"momentum_buffer"}
    twin = nn.Parameter(_params()[2].detach().clone())
    adamw = torch.optim.AdamW([twin], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for step_grads in grads:
        twin.grad = step_grads[2]
        adamw.step()
    torch.testing.assert_close(params[2].detach(), twin.detach(), rtol=1e-6, atol=1e-7)


def test_column_normalize_has_unit_rms_per_output_unit():
    m = torch.randn(5, 7)
    assert torch.allclose(column_normalize(m, 1).square().mean(dim=1), torch.ones(5))
    assert torch.allclose(column_normalize(m, 0).square().mean(dim=0), torch.ones(7))
    assert torch.equal(column_normalize(torch.zeros(2, 3), 1), torch.zeros(2, 3))  # a zero row stays finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_through_weights_only_is_bit_identical(dtype):
    grads = _grads(8)
    params = _params(dtype)
    opt = _scale(params)
    _run(opt, params, grads[:4])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twins = [nn.Parameter(t.clone()) for t in saved["params"]]
    twin_opt = _scale(twins)
    twin_opt.load_state_dict(saved["opt"])
    _run(opt, params, grads[4:])
    _run(twin_opt, twins, grads[4:])
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p.detach(), q.detach())
    assert torch.equal(opt.state[params[3]]["momentum_buffer"], twin_opt.state[twins[3]]["momentum_buffer"])


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"last_layer": True, "params": [nn.Parameter(torch.zeros(4))]}, r"last_layer=True is for the 2-D .* 1-D"),
        ({"params": [nn.Parameter(torch.zeros(2, 2, 2))]}, r"SCALE steps 1-D and 2-D parameters; .* 3-D"),
        ({"params": [nn.Parameter(torch.zeros(2, 2))], "momentun": 0.9}, r"unknown key\(s\) \['momentun'\]"),
        ({"params": [nn.Parameter(torch.zeros(2, 2))], "momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"params": [nn.Parameter(torch.zeros(2, 2))], "norm_dim": 2}, r"norm_dim must be 0 or 1, got 2"),
    ],
)
def test_bad_groups_are_refused_at_construction(group, message):
    with pytest.raises(ValueError, match=rf"SCALE param group 0: {message}"):
        SCALE([group])


def test_groups_without_names_must_say_where_the_head_is():
    with pytest.raises(ValueError, match=r"without param_names the output layer is unknown"):
        scale_param_groups([{"params": _params()}])


def test_registry_entry_builds_it_and_the_estimator_counts_only_the_head():
    from lowrank_train.memory import estimate_memory

    method = get_optimizer_method("scale")
    assert not method.lowrank
    params = _params()
    opt = method.build([{"params": params, "param_names": NAMES}], lr=LR, weight_decay=0.0, betas=BETAS, eps=EPS)
    assert isinstance(opt, SCALE)
    assert [g["last_layer"] for g in opt.param_groups if any(p is params[3] for p in g["params"])] == [True]
    shape = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "tie_word_embeddings": False}  # fmt: skip
    setup = {"optimizer": "scale", "batch_size": 1, "seq_len": 16, "dtype": "float32"}
    estimate = estimate_memory(shape, setup)
    norms = (2 * 2 + 1) * (2 * 64 * 4 + 4)
    assert estimate.details["states: block linears"] == 0
    assert estimate.details["states: embedding/head/norms"] == 1000 * 64 * 4 + norms  # the head's momentum
    adamw = estimate_memory(shape, {**setup, "optimizer": "adamw"})
    assert estimate.optimizer_states < 0.2 * adamw.optimizer_states


def test_config_validation_knows_scale():
    from lowrank_train.train import ConfigError, config_from_dict

    config = config_from_dict({"optimizer": {"name": "scale", "lr": 1e-3}})
    assert config.optimizer.method.name == "scale"
    with pytest.raises(ConfigError, match=r"optimizer.proj_bits applies to the GaLore family"):
        config_from_dict({"optimizer": {"name": "scale", "proj_bits": 4}})


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lowrank_train_cache")


@pytest.fixture
def tiny(train_cache, tmp_path, monkeypatch):
    """The training tests' tiny LLaMA run (tests/train/conftest.py's overrides)."""
    from lowrank_train.data.cache import CACHE_ENV_VAR

    monkeypatch.setenv(CACHE_ENV_VAR, str(train_cache))
    return [f"run.output_dir={tmp_path / 'run'}", *_train.TINY_OVERRIDES]


@pytest.mark.parametrize("layerwise", [False, True])
def test_a_tiny_run_learns(tiny, layerwise):
    """The training loop with optimizer.name=scale (untied head: its momentum is used): the held-out loss falls
    below the step-0 loss by a margin a never-stepped model cannot pass (it keeps its step-0 loss)."""
    from lowrank_train.train import load_config, read_metrics, train

    demo = Path(__file__).resolve().parents[2] / "recipes/configs/demo.yaml"
    config = load_config(
        demo,
        [*tiny, "optimizer.name=scale", "optimizer.lr=1e-2", "model.tie_embeddings=false",
         f"optimizer.layerwise={str(layerwise).lower()}"],
    )  # fmt: skip
    summary = train(config, log=lambda line: None)
    evals = {r["step"]: r["loss"] for r in read_metrics(config.run.output_dir) if r["split"] == "eval"}
    assert summary["steps"] == 4 and set(evals) == {0, 2, 4}
    assert evals[4] < evals[0] - 0.2, evals  # measured: 0.32 (whole-model), 0.44 (layer-wise)
