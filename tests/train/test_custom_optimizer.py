"""A method registered at run time is accepted by every consumer of the optimizer registry.

The new method ``galore_copy`` is GaLore's entry under another name with a spying builder, so each consumer can be
checked against the built-in ``galore``: the same validation, the same estimate, the same training run, the same
Trainer optimizer, and the builder of the registry entry is what actually ran.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from lowrank_train.cli import build_parser
from lowrank_train.integrations.transformers import LowRankOptimizerConfig, create_lowrank_optimizer
from lowrank_train.memory import estimate_memory, llama_shape
from lowrank_train.optim import GaLoreAdamW, get_optimizer_method, optimizer_names, registered_optimizer
from lowrank_train.train import ConfigError, load_config, read_metrics, train
from lowrank_train.train.estimate import estimate_run

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes/configs/demo.yaml"


@pytest.fixture
def galore_copy():
    """Registers ``galore_copy`` for one test; yields the list of hyperparameters its builder was called with."""
    original = get_optimizer_method("galore")
    calls = []

    def build(groups, **hyperparameters):
        calls.append(hyperparameters)
        return original.build(groups, **hyperparameters)

    method = dataclasses.replace(original, name="galore_copy", description="GaLore, registered by a test", build=build)
    # any_base=False: the Trainer glue must then build through the entry itself.
    method = dataclasses.replace(method, any_base=False)
    with registered_optimizer(method):
        yield calls
    assert "galore_copy" not in optimizer_names()


def test_config_validation_reads_the_registry(galore_copy):
    config = load_config(None, ["optimizer.name=galore_copy", "optimizer.proj_bits=4", "optimizer.rank=8"])
    assert config.optimizer.is_galore and config.optimizer.resolved_proj_bits == 4
    with pytest.raises(ConfigError, match=r"did you mean 'galore_copy'.*registered: .*galore_copy"):
        load_config(None, ["optimizer.name=galore_cpy"])
    # The command help lists the registry (read when printed; `lowrank-train --help` itself imports no torch).
    pretrain_help = build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    assert "galore_copy: GaLore, registered by a test" in pretrain_help


def test_the_estimator_treats_it_as_galore(galore_copy):
    setup = dict(batch_size=2, seq_len=64, dtype="bfloat16", rank=128, layerwise=True)
    ours = estimate_memory(llama_shape("60m"), {**setup, "optimizer": "galore_copy"})
    reference = estimate_memory(llama_shape("60m"), {**setup, "optimizer": "galore"})
    assert ours.as_dict() == reference.as_dict()
    assert ours.as_dict() != estimate_memory(llama_shape("60m"), {**setup, "optimizer": "adamw"}).as_dict()
    config = load_config(DEMO, ["optimizer.name=galore_copy"])
    assert estimate_run(config).peak == estimate_run(load_config(DEMO, ["optimizer.name=galore"])).peak


def test_the_training_loop_builds_it_and_trains_like_galore(galore_copy, tiny, tmp_path):
    common = [*tiny, "run.max_steps=2", "run.eval_every=0", "run.save_final=false", "run.memory_table=false"]
    losses = {}
    for name in ("galore", "galore_copy"):
        output = tmp_path / name
        train(load_config(DEMO, [*common, f"optimizer.name={name}", f"run.output_dir={output}"]), log=lambda _: None)
        losses[name] = [r["loss"] for r in read_metrics(output) if r["split"] == "train"]
    assert len(losses["galore"]) == 2 and losses["galore_copy"] == losses["galore"]
    assert galore_copy == [{"lr": 0.004, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}]


def test_the_trainer_glue_builds_it(galore_copy, tiny_llama, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, use_cpu=True, report_to="none")
    optimizer = create_lowrank_optimizer(tiny_llama, args, LowRankOptimizerConfig(method="galore_copy", rank=8))
    assert isinstance(optimizer, GaLoreAdamW) and len(galore_copy) == 1
    assert galore_copy[0]["lr"] == 1e-2
    with pytest.raises(ValueError, match="always builds its own inner optimizer"):
        LowRankOptimizerConfig(method="galore_copy", base="sgd")
    with pytest.raises(ValueError, match="GaLore family"):
        LowRankOptimizerConfig(method="adamw")
    # A step through the registered method's optimizer moves the projected weights.
    before = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids = torch.randint(0, 256, (2, 16))
    tiny_llama(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(before, tiny_llama.model.layers[0].self_attn.q_proj.weight)
