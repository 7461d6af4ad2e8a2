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
    ({"optim": "apollo_adamw"}, r"optim='apollo_adamw' is not a GaLore optimizer this package implements"),
    ({"optim": "lomo"}, r"optim='lomo' is not a GaLore optimizer"),
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
