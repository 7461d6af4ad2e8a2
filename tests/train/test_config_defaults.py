"""One source for every default: the CLI/YAML sections agree with the library's own schema and config classes on
defaults and on what they refuse (issue 19 item 2)."""

import dataclasses
import inspect

import pytest

from lowrank_train.integrations.trainer_config import LowRankOptimizerConfig
from lowrank_train.memory import TrainingSetup
from lowrank_train.nn.quant_linear import quantize_model
from lowrank_train.optim import GaLore
from lowrank_train.optim.layerwise import LayerwiseConfig
from lowrank_train.optim.options import GROUP_OPTIONS, check_group_option
from lowrank_train.projection import projector_names
from lowrank_train.train import ConfigError, TrainConfig, config_from_dict, load_config
from lowrank_train.train.estimate import estimate_run, training_setup
from lowrank_train.welore import WeLoreConfig


def _field_default(cls, name):
    (found,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return found.default


def _signature_default(function, name):
    return inspect.signature(function).parameters[name].default


# CLI key -> the library's default for it (GaLore's option schema, WeLoreConfig, LayerwiseConfig, the estimator).
LIBRARY_DEFAULTS = {
    "optimizer.update_gap": [GROUP_OPTIONS["update_gap"].default],
    "optimizer.scale": [GROUP_OPTIONS["scale"].default],
    "optimizer.projector": [GROUP_OPTIONS["projector"].default, _field_default(TrainingSetup, "projector")],
    "optimizer.proj_bits": [GROUP_OPTIONS["proj_bits"].default],
    "optimizer.weight_group_size": [
        _field_default(TrainingSetup, "weight_group_size"),
        _signature_default(quantize_model, "group_size"),
    ],
    "optimizer.nonfinite": [_field_default(LayerwiseConfig, "nonfinite"), _signature_default(GaLore, "nonfinite")],
    "optimizer.rank": [_field_default(LowRankOptimizerConfig, "rank")],
    "optimizer.layerwise": [
        _field_default(TrainingSetup, "layerwise"),
        _field_default(LowRankOptimizerConfig, "layerwise"),
    ],
    "optimizer.name": [_field_default(TrainingSetup, "optimizer")],
    "run.activation_checkpointing": [_field_default(TrainingSetup, "activation_checkpointing")],
    "data.grad_accum": [_field_default(TrainingSetup, "accumulation_steps")],
    "compress.strategy": [_field_default(WeLoreConfig, "strategy")],
    "compress.min_ratio": [_field_default(WeLoreConfig, "min_ratio")],
    "compress.damping": [_field_default(WeLoreConfig, "damping")],
    "compress.asvd_alpha": [_field_default(WeLoreConfig, "asvd_alpha")],
    "compress.num_threads": [_field_default(WeLoreConfig, "num_threads")],
    "compress.guard_refit": [_field_default(WeLoreConfig, "guard_refit")],
    "compress.generated_fraction": [_field_default(WeLoreConfig, "generated_fraction")],
}


def _cli_default(key):
    section, name = key.split(".")
    return getattr(getattr(TrainConfig(), section), name)


@pytest.mark.parametrize("key", sorted(LIBRARY_DEFAULTS))
def test_cli_default_is_the_librarys(key):
    for library in LIBRARY_DEFAULTS[key]:
        assert _cli_default(key) == library, key


def test_every_shared_compress_key_has_its_default_from_welore_config():
    """Every CompressConfig field that WeLoreConfig also has (but the required target) is covered above."""
    from lowrank_train.train.config import CompressConfig

    welore = {f.name for f in dataclasses.fields(WeLoreConfig)}
    shared = {f.name for f in dataclasses.fields(CompressConfig)} & welore - {"target"}
    assert {f"compress.{name}" for name in shared} <= set(LIBRARY_DEFAULTS)


def test_compress_num_threads_keeps_the_one_thread_svds():
    assert TrainConfig().compress.num_threads == 1
    assert TrainConfig().compress.welore_config().num_threads == 1


def _cli_accepts(section, values):
    base = {"optimizer": {"name": "galore", "rank": 8}} if section == "optimizer" else {}
    try:
        config_from_dict({**base, section: {**base.get(section, {}), **values}})
    except ConfigError:
        return False
    return True


def _library_accepts(check):
    try:
        check()
    except ValueError:
        return False
    return True


GALORE_VALUES = {
    "rank": [0, -1, 4],
    "update_gap": [0, -3, 1, 50],
    "scale": [0.0, -1.0, 0.5, 2.0],
    "projector": ["nope", "SVD", *projector_names()],
    "proj_bits": [None, 3, 4, 8, 16],
}


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, values in GALORE_VALUES.items() for v in values])
def test_optimizer_section_refuses_what_the_option_schema_refuses(key, value):
    library = _library_accepts(lambda: check_group_option(key, value))
    assert _cli_accepts("optimizer", {key: value}) == library


@pytest.mark.parametrize("value", [0, -1, 64])
def test_weight_group_size_is_refused_as_the_estimator_refuses_it(value):
    library = _library_accepts(lambda: TrainingSetup(optimizer="galore", rank=8, weight_group_size=value))
    assert _cli_accepts("optimizer", {"weight_group_size": value}) == library


COMPRESS_VALUES = {
    "target": [0.0, 1.0, 0.3],
    "strategy": ["nope", "uniform", "whitened-loss"],
    "min_ratio": [1.0, -0.1, 0.2],
    "damping": [-1.0, 0.0, 0.1],
    "asvd_alpha": [0.0, 1.0],
    "num_threads": [0, None, 2],
}


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, values in COMPRESS_VALUES.items() for v in values])
def test_compress_section_refuses_what_welore_config_refuses(key, value):
    library = _library_accepts(lambda: WeLoreConfig(**{"target": 0.5, key: value}))
    assert _cli_accepts("compress", {key: value}) == library


@pytest.mark.parametrize("projector", projector_names())
def test_the_estimator_accepts_every_projector_a_run_accepts(projector):
    """pretrain's memory check runs the estimator: it must not refuse a run the config accepts."""
    config = load_config(None, ["optimizer.name=galore", "optimizer.rank=8", f"optimizer.projector={projector}"])
    TrainingSetup.from_config(training_setup(config))
    assert estimate_run(config).peak > 0


@pytest.mark.parametrize("weight_bits", ["null", 8])
def test_the_estimator_accepts_the_weight_bits_a_run_accepts(weight_bits):
    config = load_config(None, ["optimizer.name=galore", "optimizer.rank=8", f"optimizer.weight_bits={weight_bits}"])
    assert estimate_run(config).peak > 0
