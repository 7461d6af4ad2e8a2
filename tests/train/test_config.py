"""Configs: every recipe validates; overrides are typed; bad keys and types are named before anything is built."""

from pathlib import Path

import pytest
import torch

from lowrank_train.train import ConfigError, TrainConfig, config_from_dict, load_config, parse_overrides
from lowrank_train.train.run_dir import config_differences

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "llama_7b_qgalore_16gb.yaml", "welore_compress.yaml", "welore_finetune.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    # The plain-dict form round-trips to the same config (what checkpoints store and resume compares).
    assert config_from_dict(config.to_dict()) == config


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(
        REPO / "recipes/configs/demo.yaml",
        [
            "optimizer.lr=3e-3",
            "run.max_steps=7",
            "run.metrics=[jsonl]",
            "optimizer.betas=[0.8, 0.95]",
            "model.num_kv_heads=2",
        ],
    )
    assert config.optimizer.lr == pytest.approx(3e-3)
    assert config.run.max_steps == 7
    assert config.run.metrics == ("jsonl",)
    assert config.optimizer.betas == (0.8, 0.95)
    assert config.model.num_kv_heads == 2


def test_parse_overrides_builds_nested_dict():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


# (overrides, words the message must contain)
BAD_CASES = [
    (["optimizer.learning_rate=1e-3"], ["optimizer.learning_rate", "allowed keys", "lr"]),
    (["trainer.steps=3"], ["trainer", "allowed keys", "optimizer"]),
    (["run.max_steps=ten"], ["run.max_steps", "integer", "ten"]),
    (["run.max_steps=2.5"], ["run.max_steps", "integer"]),
    (["optimizer.lr=fast"], ["optimizer.lr", "number", "fast"]),
    (["run.activation_checkpointing=maybe"], ["run.activation_checkpointing", "true/false"]),
    (["optimizer.betas=[0.9]"], ["optimizer.betas", "list of 2"]),
    (["optimizer.name=sgdx"], ["optimizer.name", "qgalore"]),
    (["run.dtype=float16"], ["run.dtype", "bfloat16"]),
    (["optimizer.proj_bits=3"], ["optimizer.proj_bits", "4, 8"]),
    (["optimizer.name=adamw", "optimizer.proj_bits=4"], ["optimizer.proj_bits", "GaLore"]),
    (["optimizer.name=apollo", "optimizer.proj_dtype=float16"], ["optimizer.proj_dtype", "bfloat16"]),
    (["optimizer.name=adamw", "optimizer.proj_dtype=bfloat16"], ["optimizer.proj_dtype", "GaLore"]),
    (["compress.generated_fraction=1.5"], ["compress", "generated_fraction", "[0, 1)"]),
    (["model.hidden_size=100", "model.num_heads=3"], ["model.hidden_size", "divisible"]),
    (["data.seq_len=4096"], ["data.seq_len", "max_position_embeddings"]),
    (["run=3"], ["run", "mapping"]),
    (["optimizer.rank=128"], ["optimizer.rank", "128", "smallest side"]),
    (["noequals"], ["noequals", "section.key=value"]),
]


@pytest.mark.parametrize(("overrides", "words"), BAD_CASES, ids=lambda c: str(c))
def test_bad_configs_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "recipes/configs/demo.yaml", overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_errors_come_before_any_model(monkeypatch):
    """A bad key fails in load_config, before the CLI reaches the model builder."""
    import lowrank_train.train.loop as model_module
    from lowrank_train.cli import main

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built for an invalid config")

    monkeypatch.setattr(model_module, "build_model", forbidden)
    assert main(["pretrain", str(REPO / "recipes/configs/demo.yaml"), "model.hidden=3"]) == 2


def test_compress_generated_fraction_reaches_welore():
    config = load_config(REPO / "recipes/configs/demo.yaml", ["compress.generated_fraction=0.6667"])
    assert config.compress.welore_config().generated_fraction == 0.6667
    assert load_config(REPO / "recipes/configs/demo.yaml").compress.welore_config().generated_fraction is None


def test_proj_dtype_reaches_the_projected_group():
    from lowrank_train.train.setup import pretrain_param_groups

    overrides = ["optimizer.name=apollo", "optimizer.proj_dtype=bfloat16"]
    config = load_config(REPO / "recipes/configs/demo.yaml", overrides)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    groups = pretrain_param_groups(model, config.optimizer)
    assert [g.get("proj_dtype") for g in groups if "rank" in g] == ["bfloat16"]
    plain = load_config(REPO / "recipes/configs/demo.yaml", ["optimizer.name=apollo"])
    assert all("proj_dtype" not in g for g in pretrain_param_groups(model, plain.optimizer))


def test_a_key_an_older_checkpoint_lacks_counts_as_its_default():
    saved = TrainConfig().to_dict()
    del saved["compress"]["guard_refit"], saved["optimizer"]["dense_state_bits"]
    assert config_differences(saved, TrainConfig().to_dict()) == {}
    changed = config_from_dict({"optimizer": {"name": "galore", "dense_state_bits": 8}}).to_dict()
    saved_galore = config_from_dict({"optimizer": {"name": "galore"}}).to_dict()
    del saved_galore["optimizer"]["dense_state_bits"]
    assert config_differences(saved_galore, changed) == {"optimizer.dense_state_bits": (None, 8)}


def test_config_differences_ignore_reporting_keys():
    a = load_config(None).to_dict()
    b = load_config(None, ["run.output_dir=elsewhere", "run.log_every=3"]).to_dict()
    c = load_config(None, ["optimizer.weight_decay=0.5"]).to_dict()
    d = load_config(None, ["optimizer.lr=0.5"]).to_dict()
    assert config_differences(a, b) == {}
    assert config_differences(a, c) == {"optimizer.weight_decay": (0.0, 0.5)}
    assert config_differences(a, d) == {}  # lr may change on --resume (recorded in resume_changes.jsonl)
