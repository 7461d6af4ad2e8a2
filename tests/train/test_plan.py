"""``estimate --fit``: the planner's search against brute force, its YAML runs through load_config, clear refusals."""

import itertools

import pytest
import yaml

from lowrank_train.cli import main
from lowrank_train.memory import estimate_memory, llama_shape
from lowrank_train.memory.plan import NothingFitsError, parse_bytes, plan_memory, time_per_token
from lowrank_train.train import load_config
from lowrank_train.train.estimate import estimate_run, model_shape_source, training_setup

BIG = "recipes/configs/llama_1b.yaml"
SETUP = {
    "batch_size": 8,
    "accumulation_steps": 2,
    "seq_len": 256,
    "dtype": "bfloat16",
    "optimizer": "galore",
    "rank": 256,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GiB", 12 * 2**30),
        ("16GB", 16 * 10**9),
        ("512 MiB", 2**29),
        ("8G", 8 * 2**30),
        (1024, 1024),
        ("1.5GiB", 3 * 2**29),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["12 parsecs", "", "-1GiB", "0"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="memory"):
        parse_bytes(text)


def test_best_plan_is_the_brute_force_optimum():
    """Against an independent enumeration: the best same-math plan is the fastest fitting one by the cost model."""
    shape = llama_shape("1b")
    budget = 14 * 2**30
    best = plan_memory(shape, SETUP, budget)[0]
    assert best.estimate.peak <= budget and best.fidelity == 0
    fitting = []
    for micro, ckpt, chunk, lw in itertools.product([1, 2, 4, 8, 16], [False, True], [False, True], [False, True]):
        setup = {
            **SETUP,
            "batch_size": micro,
            "accumulation_steps": 16 // micro,
            "activation_checkpointing": ckpt,
            "chunked_loss": chunk,
            "layerwise": lw,
        }
        estimate = estimate_memory(shape, setup)
        if estimate.peak <= budget:
            cost = (1 + 1024 / (micro * 256)) * (4 / 3 if ckpt else 1)
            fitting.append(cost)
    assert fitting, "the budget should admit a same-math plan"
    base_cost = 1 + 1024 / (8 * 256)
    assert best.relative_time == pytest.approx(min(fitting) / base_cost)
    assert best.setup.batch_size * best.setup.accumulation_steps == 16  # the global batch is kept


def test_math_changes_only_when_nothing_else_fits():
    shape = llama_shape("1b")
    same_math_floor = min(p.estimate.peak for p in plan_memory(shape, SETUP, 10**15) if p.fidelity == 0)
    below = plan_memory(shape, SETUP, same_math_floor - 1)
    assert below[0].fidelity > 0 and below[0].estimate.peak < same_math_floor
    assert all(p.fidelity > 0 for p in below)
    assert time_per_token(below[0].setup) > 0


def test_nothing_fits_names_the_smallest_plan():
    with pytest.raises(
        NothingFitsError, match=r"nothing the planner tries fits in 1.00 GiB: the smallest plan needs"
    ) as info:
        plan_memory(llama_shape("7b"), SETUP, "1GiB")
    everything = plan_memory(llama_shape("7b"), SETUP, 10**15)
    assert info.value.smallest.estimate.peak == min(p.estimate.peak for p in everything)


def test_fit_writes_a_config_that_loads_and_fits(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["estimate", BIG, "--fit", "7GiB", "--plan-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plan (" in printed and "config GiB" in printed and "plan GiB" in printed and f"wrote {out}" in printed
    planned = load_config(out)
    assert estimate_run(planned).peak <= 7 * 2**30 < estimate_run(load_config(BIG)).peak
    original = load_config(BIG)
    assert planned.data.batch_size * planned.data.grad_accum == original.data.batch_size * original.data.grad_accum
    assert planned.model == original.model and planned.data.seq_len == original.data.seq_len
    assert yaml.safe_load(out.read_text())["model"]["hidden_size"] == original.model.hidden_size


def test_fit_refusal_through_the_cli(capsys):
    assert main(["estimate", BIG, "--fit", "64MiB", "--plan-out", "/nonexistent/never.yaml"]) == 2
    err = capsys.readouterr().err
    assert "nothing the planner tries fits in 64.0 MiB" in err and "the smallest plan needs" in err


def test_planned_demo_config_trains(tiny, tmp_path):
    """The YAML --fit writes is a config pretrain runs (at tiny shapes, through the CLI)."""
    out = tmp_path / "demo.fit.yaml"
    assert main(["estimate", "recipes/configs/demo.yaml", *tiny, "--fit", "64GiB", "--plan-out", str(out)]) == 0
    planned = load_config(out)
    assert model_shape_source(planned)["hidden_size"] == 32 and training_setup(planned)["optimizer"] == "qgalore"
    assert main(["pretrain", str(out), "run.memory_table=false"]) == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_scale_is_not_offered_an_8bit_adam_it_does_not_use():
    # SCALE keeps one momentum (the head's), not Adam moments: no "fewer moment bits" method is a cheaper variant.
    setup = {**SETUP, "optimizer": "scale"}
    plans = plan_memory(llama_shape("1b"), setup, 10**15)
    assert {p.setup.optimizer for p in plans} == {"scale"}
