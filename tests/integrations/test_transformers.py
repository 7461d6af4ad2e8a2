"""Hugging Face Trainer with our optimizers: reference AdamW, each method trains, layer-wise = step-wise, resume."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from lowrank_train.integrations.transformers import (
    LowRankOptimizerConfig,
    LowRankTrainer,
    TrainerLayerwiseOptimizer,
    create_lowrank_optimizer,
    create_lowrank_optimizer_and_scheduler,
)
from lowrank_train.nn import QuantLinear, quantize_model
from lowrank_train.optim import GaLore, QGaLoreAdamW8bit, get_optimizer_method, lowrank_param_groups
from lowrank_train.optim.options import GALORE_DEFAULTS, GROUP_OPTIONS

_spec = importlib.util.spec_from_file_location(
    "arithmetic_tokens", pathlib.Path(__file__).with_name("arithmetic_tokens.py")
)
_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_data)
ArithmeticTokens = _data.ArithmeticTokens


def training_args(output_dir, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a plain float tensor (INT8 weights dequantized: their Parameter is an empty carrier)."""
    params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            params[f"{name}.weight"] = module.dequantized_weight(torch.float32)
    return params


def quantized_if_qgalore(model: torch.nn.Module, config: LowRankOptimizerConfig) -> torch.nn.Module:
    """Q-GaLore runs are tested with INT8 block weights, its full setting."""
    return quantize_model(model, group_size=64) if config.method == "qgalore" else model


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_identity_projection_reproduces_trainer_adamw(tiny_llama, tmp_path):
    """Full-rank identity GaLore through our builder == Trainer's own torch AdamW (lr, betas, decay split, warmup)."""
    initial = params_of(tiny_llama)
    args = training_args(tmp_path / "ref", optim="adamw_torch", max_steps=4)
    Trainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens()).train()
    reference = params_of(tiny_llama)

    with torch.no_grad():
        for name, p in tiny_llama.named_parameters():
            p.copy_(initial[name])
    args = training_args(tmp_path / "ours", max_steps=4)
    config = LowRankOptimizerConfig(rank=1, scale=1.0, projector="identity")
    optimizers = create_lowrank_optimizer_and_scheduler(tiny_llama, args, config)
    assert isinstance(optimizers[0], GaLore) and optimizers[1] is not None
    Trainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens(), optimizers=optimizers).train()
    for name, p in tiny_llama.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(reference[name], initial[name]), f"{name} did not move"


METHODS = [
    pytest.param(LowRankOptimizerConfig(rank=8, update_gap=3, scale=1.0), GaLore, id="galore"),
    pytest.param(
        LowRankOptimizerConfig(method="qgalore", rank=8, update_gap=3, scale=1.0, proj_group_size=64),
        QGaLoreAdamW8bit,
        id="qgalore",
    ),
    pytest.param(
        LowRankOptimizerConfig(rank=8, update_gap=3, scale=1.0, layerwise=True),
        TrainerLayerwiseOptimizer,
        id="layerwise",
    ),
]


@pytest.mark.parametrize("config, optimizer_cls", METHODS)
def test_trainer_trains_each_method(tiny_llama, tmp_path, config, optimizer_cls):
    model = quantized_if_qgalore(tiny_llama, config)
    trainer = LowRankTrainer(
        model=model, args=training_args(tmp_path, max_steps=8), train_dataset=ArithmeticTokens(), lowrank=config
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, optimizer_cls)  # accelerate wraps the optimizer
    losses = logged_losses(trainer)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses
    if config.layerwise:  # the engine's norm is logged instead of Trainer's (which sees no gradient)
        norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
        assert all(n > 0 for n in norms)


def test_layerwise_matches_stepwise_galore(tiny_llama, tmp_path):
    """Layer-wise stepping inside backward gives the same parameters as one optimizer.step() per batch."""
    initial = params_of(tiny_llama)
    results = []
    for layerwise in (False, True):
        with torch.no_grad():
            for name, p in tiny_llama.named_parameters():
                p.copy_(initial[name])
        config = LowRankOptimizerConfig(rank=8, update_gap=2, scale=1.0, layerwise=layerwise)
        args = training_args(tmp_path / str(layerwise), max_steps=4, max_grad_norm=0.0)
        LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens(), lowrank=config).train()
        results.append(params_of(tiny_llama))
    for name in initial:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6, msg=name)


RESUME = [
    pytest.param(LowRankOptimizerConfig(rank=8, update_gap=2, scale=1.0), id="galore"),
    pytest.param(
        LowRankOptimizerConfig(
            method="qgalore", rank=8, update_gap=2, scale=1.0, group_options={"proj_group_size": 64}
        ),
        id="qgalore",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        LowRankOptimizerConfig(rank=8, update_gap=2, scale=1.0, layerwise=True), id="layerwise", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize("config", RESUME)
def test_trainer_resume_matches_uninterrupted_run(tiny_llama, tmp_path, config):
    """Checkpoint at step 3 (basis refreshed at 0 and 2), resume in a fresh model: same final parameters.

    Trainer reloads optimizer.pt with torch.load(weights_only=True); Q-GaLore's INT4 basis codes, adaptive-gap
    history and INT8 weights (stochastic rounding keyed by (seed, step)) must all come back.
    """
    from transformers import LlamaForCausalLM

    args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    model = quantized_if_qgalore(tiny_llama, config)
    LowRankTrainer(model=model, args=args, train_dataset=ArithmeticTokens(), lowrank=config).train()
    uninterrupted = params_of(model)

    torch.manual_seed(123)  # a differently initialised model: everything must come from the checkpoint
    fresh = quantized_if_qgalore(LlamaForCausalLM(tiny_llama.config), config)
    trainer = LowRankTrainer(model=fresh, args=args, train_dataset=ArithmeticTokens(), lowrank=config)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    for name, p in params_of(fresh).items():
        torch.testing.assert_close(p, uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="method must be one of"):
        LowRankOptimizerConfig(method="lora")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LowRankOptimizerConfig(rank=0)
    with pytest.raises(ValueError, match="8-bit AdamW"):
        LowRankOptimizerConfig(method="qgalore", base="adamw")
    with pytest.raises(ValueError, match="must not set"):
        LowRankOptimizerConfig(group_options={"rank": 4})
    assert LowRankOptimizerConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)


# (keywords, the message): each refused when the config is built, naming the option as the config spells it.
BAD_CONFIGS = [
    ({"scael": 1.0}, r"LowRankOptimizerConfig: unknown option 'scael' \(did you mean 'scale'\?\)"),
    ({"update_proj_gap": 50}, "update_proj_gap is called update_gap here"),
    ({"proj_type": "std"}, "proj_type has no equivalent"),
    ({"rank": -4}, "LowRankOptimizerConfig: rank must be a positive integer, got -4"),
    ({"projector": "svdd"}, r"projector must be a registered projector name, got 'svdd' \(did you mean 'svd'\?\)"),
    ({"proj_bits": 3}, "proj_bits must be 4, 8 or None"),
    ({"full_rank_fallback": "yes"}, "full_rank_fallback must be True or False"),
    ({"refresh_threshold": 1.5}, r"refresh_threshold must be in \(0, 1\]"),
    ({"proj_bits": 4, "proj_group_size": 3}, "proj_group_size must be even"),
    ({"adaptive_refresh": True, "update_gap": 10, "max_update_gap": 5}, "max_update_gap"),
    ({"proj_bits": 8, "group_options": {"proj_bits": 4}}, r"group_options must not set \['proj_bits'\]"),
    ({"group_options": {"scael": 1.0}}, "did you mean 'scale'"),
    ({"group_options": {"lr": -1.0}}, "lr must be"),
    ({"base": "adamm"}, "base must be None or one of"),
]


@pytest.mark.parametrize("keywords, message", BAD_CONFIGS, ids=[str(k) for k, _ in BAD_CONFIGS])
def test_config_refuses_at_construction(keywords, message):
    with pytest.raises(ValueError, match=message):
        LowRankOptimizerConfig(**keywords)


def test_config_refuses_positional_arguments():
    with pytest.raises(ValueError, match="keyword arguments only"):
        LowRankOptimizerConfig("galore")


def test_config_takes_every_group_option_by_name(tiny_llama):
    """Each option of the one schema is a keyword; the optimizer's low-rank group gets exactly those values,
    the same group that lowrank_param_groups builds from the same keywords (the reference)."""
    values = {
        "update_gap": 7, "scale": 0.5, "projector": "rsvd", "proj_seed": 3, "seed_offset": 2, "oversample": 4,
        "power_iters": 2, "full_rank_fallback": True, "proj_bits": 8, "proj_group_size": 32,
        "adaptive_refresh": True, "refresh_threshold": 0.5, "refresh_growth": 3.0, "refresh_history": 2,
        "max_update_gap": 21, "update": "fira", "scale_type": "tensor", "norm_growth_limit": 1.05,
        "proj_dtype": "bfloat16",
    }  # fmt: skip
    assert set(values) | {"rank"} == set(GROUP_OPTIONS), "a schema option is missing from this test"
    config = LowRankOptimizerConfig(rank=np.int64(8), **{k: _numpy_if_int(v) for k, v in values.items()})
    assert config.rank == 8 and type(config.rank) is int  # numpy integers are accepted and converted
    for name, value in values.items():
        assert getattr(config, name) == value and type(getattr(config, name)) is type(value), name
    optimizer = create_lowrank_optimizer(tiny_llama, training_args("unused"), config)
    reference = lowrank_param_groups(tiny_llama, rank=8, **values)[0]
    group = next(g for g in optimizer.param_groups if "rank" in g)
    for name in GROUP_OPTIONS:
        assert group[name] == reference[name], name
    assert group["param_names"] == reference["param_names"]


def _numpy_if_int(value):
    return np.int64(value) if type(value) is int else value


def test_config_fills_the_method_defaults():
    """Left-out options take the method's defaults (registry: Q-GaLore's INT4 basis, adaptive refresh)."""
    qgalore = get_optimizer_method("qgalore")
    config = LowRankOptimizerConfig(method="qgalore")
    assert (config.proj_bits, config.adaptive_refresh) == (qgalore.proj_bits, qgalore.adaptive_refresh) == (4, True)
    assert LowRankOptimizerConfig(method="qgalore", proj_bits=None).proj_bits is None  # an explicit None stays
    plain = LowRankOptimizerConfig()
    assert {name: getattr(plain, name) for name in GALORE_DEFAULTS} == GALORE_DEFAULTS
    # The older spelling still works: a GaLore option inside group_options moves to its field.
    moved = LowRankOptimizerConfig(group_options={"proj_group_size": 64, "lr": 1e-3})
    assert moved.proj_group_size == 64 and moved.group_options == {"lr": 1e-3}
    assert dataclasses.replace(moved, rank=4) == LowRankOptimizerConfig(rank=4, proj_group_size=64,
                                                                         group_options={"lr": 1e-3})  # fmt: skip


def test_full_rank_fallback_from_the_config(tiny_llama, tmp_path):
    """rank = hidden size (64): refused when the trainer is built, naming the config's keyword; with
    full_rank_fallback=True those weights get the plain update and training runs."""
    args = training_args(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"LowRankOptimizerConfig\(full_rank_fallback=True\)"):
        LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens(), lowrank=LowRankOptimizerConfig(
            rank=64))  # fmt: skip
    config = LowRankOptimizerConfig(rank=64, full_rank_fallback=True)
    trainer = LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens(), lowrank=config)
    trainer.train()
    assert len(logged_losses(trainer)) == 2


def test_lowrank_next_to_a_non_default_optim_is_refused(tiny_llama, tmp_path):
    args = training_args(tmp_path, optim="adafactor")
    with pytest.raises(ValueError, match="would be ignored"):
        LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens(), lowrank=LowRankOptimizerConfig())


def test_layerwise_step_refuses_a_partial_accumulation(tiny_llama, tmp_path):
    args = training_args(tmp_path, gradient_accumulation_steps=2)
    optimizer, _ = create_lowrank_optimizer_and_scheduler(
        tiny_llama, args, LowRankOptimizerConfig(rank=8, layerwise=True)
    )
    batch = ArithmeticTokens()[0]
    tiny_llama(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    with pytest.raises(RuntimeError, match="multiple of gradient_accumulation_steps"):
        optimizer.step()


# ----- issue 21: APOLLO's and SCALE's entries through the same glue ---------------------------------------------
def test_config_takes_the_apollo_method_defaults_and_refuses_what_they_fix():
    from lowrank_train.optim.presets import APOLLO_MINI_OPTIONS, APOLLO_OPTIONS

    apollo = LowRankOptimizerConfig(method="apollo")
    assert {k: getattr(apollo, k) for k in ("update", "projector", "scale", "scale_type")} == {
        k: v for k, v in APOLLO_OPTIONS.items() if k != "rank"
    }
    mini = LowRankOptimizerConfig(method="apollo_mini", rank=1)
    assert (mini.scale, mini.scale_type) == (APOLLO_MINI_OPTIONS["scale"], "tensor")
    assert LowRankOptimizerConfig(method="apollo", scale=2.0).scale == 2.0
    with pytest.raises(ValueError, match=r"method='apollo' fixes projector='random', got projector='svd'"):
        LowRankOptimizerConfig(method="apollo", projector="svd")
    with pytest.raises(ValueError, match=r"method='fira' fixes update='fira', got update='apollo'"):
        LowRankOptimizerConfig(method="fira", update="apollo")


def test_apollo_scale_from_the_config_reaches_the_groups(tiny_llama, tmp_path):
    """APOLLOAdamW writes its own alpha over the groups' unless told: the glue passes the config's."""
    args = training_args(tmp_path)
    optimizer = create_lowrank_optimizer(tiny_llama, args, LowRankOptimizerConfig(method="apollo", rank=4, scale=3.0))
    assert [g["scale"] for g in optimizer.param_groups if "rank" in g] == [3.0]


def test_scale_method_trains_with_the_head_momentum(tiny_llama, tmp_path):
    """SCALE (not a projecting method) through the same glue: every trainable parameter, the head's momentum only,
    Trainer's no-decay split, and a short run that learns."""
    from lowrank_train.optim import SCALE

    with pytest.raises(ValueError, match=r"does not project gradients, so the GaLore options \['update_gap'\]"):
        LowRankOptimizerConfig(method="scale", update_gap=5)
    args = training_args(tmp_path, max_steps=8, learning_rate=3e-3)
    config = LowRankOptimizerConfig(method="scale")
    trainer = LowRankTrainer(model=tiny_llama, args=args, train_dataset=ArithmeticTokens(), lowrank=config)
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, SCALE)
    heads = [g for g in optimizer.param_groups if g["last_layer"]]
    assert [n for g in heads for n in g["param_names"]] == ["lm_head.weight"]
    stateful = {id(p) for p, state in optimizer.state.items() if state and p.dim() == 2}
    assert stateful == {id(tiny_llama.lm_head.weight)}
    decay = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["param_names"]}
    assert decay["model.norm.weight"] == 0.0 and decay["model.layers.0.mlp.up_proj.weight"] == 0.1
    losses = logged_losses(trainer)
    assert sum(losses[-2:]) / 2 < 0.95 * losses[0], losses  # measured: 0.917
