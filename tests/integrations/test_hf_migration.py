"""Switching from transformers' GaLore: the same TrainingArguments (optim="galore_*", optim_target_modules,
optim_args) with LowRankTrainer instead of Trainer (issue 15 item 2).

References: transformers' own target-module rule (``check_target_module_exists``, nn.Linear, named parameters) for
the projected weights; a GaLoreAdamW built by hand and handed to ``Trainer(optimizers=...)`` for the numbers; an
uninterrupted run for resume.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM, Trainer, TrainingArguments
from transformers.trainer_utils import check_target_module_exists

from lowrank_train.integrations.transformers import (
    HF_GALORE_OPTIMIZERS,
    LowRankTrainer,
    TrainerLayerwiseOptimizer,
    lowrank_config_from_training_args,
)
from lowrank_train.optim import GaLore, GaLoreAdamW

_spec = importlib.util.spec_from_file_location(
    "arithmetic_tokens", pathlib.Path(__file__).with_name("arithmetic_tokens.py")
)
_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_data)
ArithmeticTokens = _data.ArithmeticTokens

# transformers' GaLore values -> the inner optimizer class each must step with.
BASE_CLASSES = {
    "galore_adamw": "torch.optim.adamw.AdamW",
    "galore_adamw_8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "galore_adafactor": "transformers.optimization.Adafactor",
}


def hf_args(output_dir, **overrides) -> TrainingArguments:
    """TrainingArguments as a transformers GaLore user writes them (tiny run on the CPU)."""
    options = dict(
        output_dir=str(output_dir),
        optim="galore_adamw",
        optim_target_modules=["attn", "mlp"],
        optim_args="rank=8, update_proj_gap=2, scale=0.5, proj_type=std",
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def transformers_targets(model: nn.Module, optim_target_modules) -> list[str]:
    """The weights transformers' GaLore projects, by transformers' own rule (its Trainer's low-rank setup)."""
    all_linear = isinstance(optim_target_modules, str) and optim_target_modules.replace("_", "-") == "all-linear"
    names = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (all_linear or check_target_module_exists(optim_target_modules, name))
    ]
    return [n for n, _ in model.named_parameters() if n in names]


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def inner_optimizers(optimizer) -> list[GaLore]:
    engine = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    return list(engine._inner) if isinstance(engine, TrainerLayerwiseOptimizer) else [engine]


@pytest.mark.parametrize("optim", list(HF_GALORE_OPTIMIZERS))
def test_each_transformers_galore_value_builds_our_optimizer(tiny_llama, tmp_path, optim):
    """The same TrainingArguments as for transformers' GaLore: rank, gap, scale and targets as transformers reads
    them, the right inner optimizer, layer-wise for the *_layerwise values, and a short run that trains."""
    args = hf_args(tmp_path, optim=optim, max_steps=2)
    trainer = LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens())
    trainer.train()
    engine = trainer.optimizer.optimizer
    assert isinstance(engine, TrainerLayerwiseOptimizer) == optim.endswith("_layerwise")
    lowrank = [g for g in engine.param_groups if "rank" in g]
    assert len(lowrank) == 1
    assert (lowrank[0]["rank"], lowrank[0]["update_gap"], lowrank[0]["scale"]) == (8, 2, 0.5)
    assert lowrank[0]["param_names"] == transformers_targets(tiny_llama, ["attn", "mlp"])
    base = BASE_CLASSES[optim.removesuffix("_layerwise")]
    for inner in inner_optimizers(trainer.optimizer):
        assert isinstance(inner, GaLore)
        assert f"{type(inner._base).__module__}.{type(inner._base).__name__}" == base
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize(
    "optim_target_modules",
    ["all-linear", "all_linear", [r".*\.self_attn\..*"], ["q_proj", "down_proj"], r"model\.layers\.0\.mlp\..*"],
)
def test_target_modules_have_transformers_meaning(tiny_llama, tmp_path, optim_target_modules):
    """all-linear (the untied head included), substring lists, regex lists and one regex, as transformers reads
    them; no optimizer step needed."""
    args = hf_args(tmp_path, optim_target_modules=optim_target_modules)
    trainer = LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens())
    groups = trainer.create_optimizer().param_groups
    projected = [n for g in groups if "rank" in g for n in g["param_names"]]
    assert projected == transformers_targets(tiny_llama, optim_target_modules)


def test_tied_head_is_left_out_as_transformers_does(tiny_llama, tmp_path):
    tiny_llama.config.tie_word_embeddings = True
    tiny_llama.tie_weights()
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    config = lowrank_config_from_training_args(hf_args(tmp_path, optim_target_modules="all-linear"), tiny_llama)
    assert "lm_head" not in config.target_modules and len(config.target_modules) == 14
    assert transformers_targets(tiny_llama, "all-linear") == [f"{n}.weight" for n in config.target_modules]


def test_galore_adamw_matches_a_hand_built_galore_adamw(tiny_llama, tmp_path):
    """Reference: GaLoreAdamW over the groups transformers' GaLore builds (targets with rank/gap/scale, the rest
    plain), lr, betas and eps from the same TrainingArguments, given to Trainer(optimizers=...)."""
    initial = params_of(tiny_llama)
    args = hf_args(tmp_path / "ref", optim="adamw_torch", optim_target_modules=None, optim_args=None)
    targets = set(transformers_targets(tiny_llama, ["attn", "mlp"]))
    named = list(tiny_llama.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in targets]},
        {"params": [p for n, p in named if n in targets], "rank": 8, "update_gap": 2, "scale": 0.5},
    ]
    # fused=False: the Trainer glue steps torch's AdamW without the fused kernel, whose different rounding moves
    # near-zero-gradient embedding rows by ~1e-5 (the same math, not the same bits).
    optimizer = GaLoreAdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_epsilon, weight_decay=0.0, fused=False)  # fmt: skip
    reference = Trainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens(), optimizers=(optimizer, None))
    reference.train()
    expected = params_of(tiny_llama)
    expected_losses = [e["loss"] for e in reference.state.log_history if "loss" in e]

    with torch.no_grad():
        for name, p in tiny_llama.named_parameters():
            p.copy_(initial[name])
    ours = LowRankTrainer(model=tiny_llama, args=hf_args(tmp_path / "ours"), train_dataset=ArithmeticTokens())
    ours.train()
    assert [e["loss"] for e in ours.state.log_history if "loss" in e] == pytest.approx(expected_losses, rel=1e-5)
    for name, p in tiny_llama.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(expected[name], initial[name]), f"{name} did not move"


@pytest.mark.parametrize("optim", ["galore_adamw", pytest.param("galore_adamw_layerwise", marks=pytest.mark.slow)])
def test_resume_from_a_trainer_checkpoint(tiny_llama, tmp_path, optim):
    """Checkpoint at step 2 (a basis refresh at 0 and 2), reloaded by Trainer with torch.load(weights_only=True)
    into a differently initialised model: the same final parameters as the uninterrupted run."""
    args = hf_args(tmp_path, optim=optim, max_steps=4, save_strategy="steps", save_steps=2)
    LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens()).train()
    uninterrupted = params_of(tiny_llama)

    torch.manual_seed(123)
    fresh = LlamaForCausalLM(tiny_llama.config)
    trainer = LowRankTrainer(model=fresh, args=args, train_dataset=ArithmeticTokens())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for name, p in params_of(fresh).items():
        torch.testing.assert_close(p, uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)


# (TrainingArguments overrides, the message): refused when LowRankTrainer is built, before any training.
REFUSED = [
    ({"optim": "lomo"}, r"optim='lomo' is not a GaLore or APOLLO optimizer this package implements"),
    ({"optim": "apollo_adamw", "optim_args": "rank=8, proj=svd"}, r"proj='svd': only apollo-torch's 'random'"),
    ({"optim": "apollo_adamw", "optim_args": "rank=8, proj_type=left"}, r"proj_type='left' is not implemented"),
    ({"optim": "apollo_adamw", "optim_args": "rank=8, scale_type=row"}, r"scale_type must be one of"),
    ({"optim": "apollo_adamw", "optim_args": "rank=8, scale=-1"}, r"scale must be a number > 0, got -1"),
    ({"optim": "apollo_adamw", "optim_args": "rank=64"}, r"rank 64 is not below min\(m, n\) = 64"),
    ({"optim": "adamw_torch"}, r"or pass lowrank=LowRankOptimizerConfig"),
    ({"optim_args": "rank=8, proj_type=reverse_std"}, r"proj_type='reverse_std' is not implemented here"),
    ({"optim_args": "rank=8, update_proj_gap=0"}, r"optim_args: update_proj_gap must be an integer >= 1, got '0'"),
    ({"optim_args": "rnak=8"}, r"unknown key 'rnak' \(did you mean 'rank'\?\)"),
    ({"optim_args": "rank"}, r"expected comma-separated key=value pairs"),
    ({"optim_target_modules": None}, r"optim_target_modules is required"),
    ({"optim_target_modules": ["no_such_layer"]}, r"selects no linear layer"),
    ({"optim_args": "rank=64"}, r"optim_args: rank 64 is not below min\(m, n\) = 64 .*full_rank_fallback=true"),
]


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[str(o) for o, _ in REFUSED])
def test_unsupported_settings_are_refused_at_construction(tiny_llama, tmp_path, overrides, message):
    args = hf_args(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens())


def test_our_option_names_pass_through_optim_args(tiny_llama, tmp_path):
    """Beyond transformers' keys, any group option of ours by its own name (string values parsed)."""
    args = hf_args(tmp_path, optim_args="rank=64, full_rank_fallback=true, projector=rsvd, proj_bits=8")
    trainer = LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens())
    config = trainer.lowrank
    assert (config.rank, config.full_rank_fallback, config.projector, config.proj_bits) == (64, True, "rsvd", 8)
    assert (config.update_gap, config.scale) == (200, 0.25)  # transformers' defaults for the keys left out


# ----- APOLLO (issue 21): apollo-torch's group keys and transformers' optim="apollo_adamw" -----------------------
RANK = 4


def _gaussian(rows: int, rank: int) -> torch.Tensor:
    """One Gaussian per (rows, rank): both libraries draw the same projection for a weight of that shape."""
    return torch.randn(rows, rank, generator=torch.Generator().manual_seed(rows * 7919 + rank))


@pytest.fixture
def shared_projection(monkeypatch):
    """apollo-torch and our 'random' projector draw from :func:`_gaussian` (their seeds, a 1-based parameter index
    advanced by ``next_seed`` at each refresh, cannot be mapped onto ours, so the matrices are shared instead).
    apollo-torch's P has N(0, 1/r) entries, ours N(0, 1/rows): the same Gaussian, scaled each library's way."""
    import dataclasses

    random_projector = pytest.importorskip("apollo_torch.random_projector")
    from lowrank_train.projection.projectors import PROJECTORS

    def theirs(size, seed, device=None, dtype=torch.float32):
        del seed
        rows, cols = size
        left = cols in (RANK, 1)  # (m, r) projects rows; (r, n) columns
        matrix = _gaussian(rows, cols) if left else _gaussian(cols, rows).mT
        return matrix.to(device=device, dtype=dtype).contiguous()

    def ours(matrix, rank, generator=None, **options):
        del generator, options
        return _gaussian(matrix.shape[0], rank).to(matrix.device) * matrix.shape[0] ** -0.5

    monkeypatch.setattr(random_projector, "stable_randn", theirs)
    monkeypatch.setitem(PROJECTORS, "random", dataclasses.replace(PROJECTORS["random"], build=ours))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))  # 32 x 16 and 8 x 32: no square weight


def _steps(model, optimizer, steps=5):
    for step in range(steps):
        optimizer.zero_grad()
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        optimizer.step()


# (apollo-torch group options, constructor options): APOLLO without the limiter and real betas; with the limiter
# (betas 0: apollo-torch limits before Adam's bias correction, we after, and the corrections are then 1); Mini.
PEER_CASES = [
    ({"rank": RANK, "scale_type": "channel", "scale": 1.0}, {"betas": (0.9, 0.999), "disable_nl": True}),
    ({"rank": RANK, "scale_type": "channel", "scale": 4.0}, {"betas": (0.0, 0.0), "disable_nl": False}),
    ({"rank": 1, "scale_type": "tensor", "scale": 128.0}, {"betas": (0.9, 0.999), "disable_nl": True}),
]


@pytest.mark.parametrize(("group_options", "peer_options"), PEER_CASES, ids=["apollo", "limiter", "mini"])
def test_migrated_apollo_torch_groups_step_like_apollo_torch(shared_projection, group_options, peer_options):
    """apollo-torch's own group keys (proj, scale_type, update_proj_gap, proj_type, rank, scale) through
    apollo_torch_param_groups into GaLore: the same weights as apollo-torch's APOLLOAdamW after 5 steps (a refresh
    every 2). eps 0: apollo-torch's eps sits outside Adam's bias correction, torch's inside."""
    import apollo_torch

    from lowrank_train.integrations.transformers import apollo_torch_param_groups

    def groups(model):
        weights = [model[0].weight, model[2].weight]
        options = {"proj": "random", "update_proj_gap": 2, "proj_type": "std", **group_options}
        return [{"params": [model[0].bias, model[2].bias]}, {"params": weights, **options}]

    peer_model, our_model = _mlp(), _mlp()
    disable_nl = peer_options["disable_nl"]
    hyper = {"lr": 1e-2, "betas": peer_options["betas"], "eps": 0.0, "weight_decay": 0.0}
    peer = apollo_torch.APOLLOAdamW(groups(peer_model), disable_nl=disable_nl, **hyper)
    migrated = apollo_torch_param_groups(groups(our_model), disable_nl=disable_nl)
    assert migrated[1]["update"] == "apollo" and migrated[1]["update_gap"] == 2
    assert migrated[1]["scale"] == pytest.approx(group_options["scale"] ** 0.5)
    ours = GaLore(migrated, base="adamw", **hyper)
    _steps(peer_model, peer)
    _steps(our_model, ours)
    start = dict(_mlp().named_parameters())
    for (name, p), q in zip(our_model.named_parameters(), peer_model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p.detach(), start[name].detach()), f"{name} did not move"


def test_apollo_torch_groups_are_checked_and_named():
    from lowrank_train.integrations.transformers import apollo_torch_param_groups

    weight = nn.Parameter(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"apollo-torch param group 0: proj: proj='svd'"):
        apollo_torch_param_groups([{"params": [weight], "rank": 2, "proj": "svd"}])
    with pytest.raises(ValueError, match=r"apollo-torch param group 0: scale_type must be one of"):
        apollo_torch_param_groups([{"params": [weight], "rank": 2, "scale_type": "rows"}])
    plain = {"params": [weight], "lr": 1e-3}
    assert apollo_torch_param_groups([plain]) == [plain]
    defaults = apollo_torch_param_groups([{"params": [weight], "rank": 2}])[0]
    assert (defaults["projector"], defaults["update"]) == ("random", "apollo")


def apollo_args(output_dir, **overrides) -> TrainingArguments:
    """transformers' APOLLO settings; betas 0 (see PEER_CASES) and eps 1e-6, apollo-torch's default, which
    transformers leaves on its plain group. A constant learning rate: at a warm-up step with lr 0 apollo-torch's
    limiter records that step's norm, ours (whose norms are of update / lr) skips it."""
    options = dict(
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="apollo_adamw",
        optim_target_modules=["mlp"],  # the 128 x 64 and 64 x 128 MLP weights (no square weight)
        optim_args=f"rank={RANK}, proj=random, scale_type=channel, update_proj_gap=2, scale=4, proj_type=std",
        adam_beta1=0.0,
        adam_beta2=0.0,
        adam_epsilon=1e-6,
        weight_decay=0.0,
    )
    options.update(overrides)
    return hf_args(output_dir, **options)


def test_apollo_optim_args_are_read_with_transformers_defaults(tmp_path):
    config = lowrank_config_from_training_args(apollo_args(tmp_path, optim_args=None))
    assert config.method == "apollo" and not config.layerwise
    assert (config.rank, config.update_gap, config.scale, config.scale_type) == (128, 200, 1.0, "channel")
    assert (config.projector, config.update, config.norm_growth_limit) == ("random", "apollo", None)
    layerwise = lowrank_config_from_training_args(apollo_args(tmp_path, optim="apollo_adamw_layerwise"))
    assert layerwise.layerwise and (layerwise.rank, layerwise.update_gap, layerwise.scale) == (RANK, 2, 2.0)


def test_apollo_adamw_has_transformers_groups_and_steps(tiny_llama, tmp_path, shared_projection):
    """Reference: what transformers' Trainer builds for the same TrainingArguments with apollo-torch installed:
    the same projected weights and settings, and the same weights after 3 steps.

    Only the projected (MLP) weights train: transformers gives adam_beta1/2 and adam_epsilon to the APOLLO group
    only and leaves the other group at apollo-torch's AdamW defaults (betas 0.9/0.999, eps 1e-6 outside the bias
    correction), which we do not copy: LowRankTrainer honours TrainingArguments for every group. eps 0: Adam's eps
    acts on R, which apollo-torch's N(0, 1/r) projection makes sqrt(rows / r) times ours."""
    for name, p in tiny_llama.named_parameters():
        p.requires_grad_(".mlp." in name)
    initial = params_of(tiny_llama)
    reference = Trainer(
        model=tiny_llama, args=apollo_args(tmp_path / "ref", adam_epsilon=0.0), train_dataset=ArithmeticTokens()
    )
    peer = reference.create_optimizer()
    peer = getattr(peer, "optimizer", peer)
    (peer_group,) = [g for g in peer.param_groups if "rank" in g]
    reference.train()
    expected = params_of(tiny_llama)

    with torch.no_grad():
        for name, p in tiny_llama.named_parameters():
            p.copy_(initial[name])
    args = apollo_args(tmp_path / "ours", adam_epsilon=0.0)
    ours = LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens())
    (group,) = [g for g in ours.create_optimizer().param_groups if "rank" in g]
    names = {id(p): n for n, p in tiny_llama.named_parameters()}
    assert group["param_names"] == [names[id(p)] for p in peer_group["params"]]
    assert (group["rank"], group["update_gap"], group["scale_type"]) == (
        peer_group["rank"], peer_group["update_proj_gap"], peer_group["scale_type"])  # fmt: skip
    assert group["scale"] == pytest.approx(peer_group["scale"] ** 0.5) and group["projector"] == peer_group["proj"]
    assert (group["betas"], group["eps"], group["lr"]) == (peer_group["betas"], peer_group["eps"], peer_group["lr"])
    ours.train()
    for name, p in tiny_llama.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(expected[name], initial[name]) != (".mlp." in name), f"{name} did (not) move"


def test_apollo_adamw_layerwise_builds_the_engine_and_trains(tiny_llama, tmp_path):
    from lowrank_train.optim import APOLLOAdamW

    args = apollo_args(tmp_path, optim="apollo_adamw_layerwise", max_steps=2)
    trainer = LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens())
    trainer.train()
    engine = trainer.optimizer.optimizer
    assert isinstance(engine, TrainerLayerwiseOptimizer)
    projected = [inner for inner in inner_optimizers(trainer.optimizer) if any(inner.is_lowrank(p) for p in
                 inner.param_groups[0]["params"])]  # fmt: skip
    assert len(projected) == 6 and all(isinstance(inner, APOLLOAdamW) for inner in projected)
    assert all(inner.param_groups[0]["scale"] == 2.0 for inner in projected)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
