"""Hugging Face Trainer with our optimizers: reference AdamW, each method trains, layer-wise = step-wise, resume."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from transformers import Trainer, TrainingArguments

from lowrank_train.integrations.transformers import (
    LowRankOptimizerConfig,
    LowRankTrainer,
    TrainerLayerwiseOptimizer,
    create_lowrank_optimizer_and_scheduler,
)
from lowrank_train.nn import quantize_model
from lowrank_train.optim import GaLore, QGaLoreAdamW8bit

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
    """Every parameter as a plain float tensor (INT8 weights dequantized)."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


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
        LowRankOptimizerConfig(
            method="qgalore", rank=8, update_gap=3, scale=1.0, group_options={"proj_group_size": 64}
        ),
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


def test_layerwise_step_refuses_a_partial_accumulation(tiny_llama, tmp_path):
    args = training_args(tmp_path, gradient_accumulation_steps=2)
    optimizer, _ = create_lowrank_optimizer_and_scheduler(
        tiny_llama, args, LowRankOptimizerConfig(rank=8, layerwise=True)
    )
    batch = ArithmeticTokens()[0]
    tiny_llama(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    with pytest.raises(RuntimeError, match="multiple of gradient_accumulation_steps"):
        optimizer.step()
