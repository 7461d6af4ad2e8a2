"""One non-finite policy for the whole run (issue 20 item 5): under ``optimizer.nonfinite: skip`` a step whose loss
is NaN applies no update, is counted (metrics, summary, closing line) and the run goes on; bounds stop a run that
keeps skipping; ``raise`` still stops at the first NaN. Before the fix the loop raised FloatingPointError on the
very step the optimizer had skipped."""

from pathlib import Path

import pytest
import torch

from lowrank_train.train import load_config, load_state, read_metrics, train
from lowrank_train.train import loop as loop_module

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes/configs/demo.yaml"


def _config(overrides, *extra):
    return load_config(DEMO, [*overrides, "run.eval_every=0", "run.loss_chunk_size=16", *extra])


class _NanGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (a finite loss whose gradients are not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture
def nan_at(monkeypatch):
    """``nan_at({1, 3})``: the training loss of those micro-batches (0-based, in order) becomes NaN (with
    ``gradient_only=True`` the loss stays finite and only its gradients are NaN)."""

    def install(calls, gradient_only=False):
        real = loop_module.causal_lm_loss
        seen = {"n": 0}

        def poisoned(*args, **kwargs):
            loss = real(*args, **kwargs)
            index, seen["n"] = seen["n"], seen["n"] + 1
            if index not in calls:
                return loss
            return _NanGradient.apply(loss) if gradient_only else loss * float("nan")

        monkeypatch.setattr(loop_module, "causal_lm_loss", poisoned)

    return install


def _model_at(output, step):
    return load_state(output / "checkpoints" / f"step-{step:08d}", map_location="cpu")["model"]


CASES = [
    pytest.param(["optimizer.name=galore"], 1, id="galore"),
    pytest.param(["optimizer.name=galore", "optimizer.layerwise=true"], 1, id="galore-layerwise"),
    pytest.param(["optimizer.name=adamw", "optimizer.layerwise=true", "data.grad_accum=2"], 2, id="layerwise-accum"),
    pytest.param(["optimizer.name=galore", "data.grad_accum=2"], 2, id="galore-accum"),
]


@pytest.mark.parametrize(("options", "accum"), CASES)
def test_a_nan_loss_is_skipped_counted_and_the_run_goes_on(tiny, nan_at, options, accum):
    # the last micro-batch of step 3 (1-based) is NaN: the earlier micro-batches of that step are dropped too
    nan_at({3 * accum - 1})
    config = _config(
        tiny, *options, "optimizer.nonfinite=skip", "run.max_steps=4", "run.save_every=1", "run.keep_checkpoints=5"
    )
    lines = []
    summary = train(config, log=lines.append)
    output = Path(config.run.output_dir)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    assert any("step 3 skipped (the loss was nan; no update applied): 1 skipped so far" in x for x in lines)
    assert any(x.startswith("done: 4 steps (1 skipped: non-finite values)") for x in lines)
    records = {r["step"]: r for r in read_metrics(output) if r["split"] == "train"}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert records[3]["loss"] != records[3]["loss"]  # NaN: the window held only the skipped step
    assert torch.isfinite(torch.tensor(summary["final_eval_loss"]))
    before, after, last = _model_at(output, 2), _model_at(output, 3), _model_at(output, 4)
    for key in before:  # step 3 changed no weight; step 4 did
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(after[key], last[key]) for key in after)


@pytest.mark.parametrize("options", [["optimizer.name=galore"], ["optimizer.name=galore", "optimizer.layerwise=true"]])
def test_a_nan_gradient_under_a_finite_loss_is_counted_too(tiny, nan_at, options):
    nan_at({1}, gradient_only=True)
    lines = []
    summary = train(_config(tiny, *options, "optimizer.nonfinite=skip", "run.max_steps=3"), log=lines.append)
    assert summary["skipped_steps"] == 1
    assert any("step 2 skipped (a gradient held NaN/Inf; no update applied)" in x for x in lines)


def test_the_cli_exits_2_when_the_bound_stops_the_run(tiny, nan_at, capsys):
    from lowrank_train.cli import main

    nan_at({0, 1})
    argv = ["pretrain", str(DEMO), *tiny, "run.eval_every=0", "run.loss_chunk_size=16", "optimizer.name=galore"]
    assert main([*argv, "optimizer.nonfinite=skip", "optimizer.max_consecutive_skips=1"]) == 2
    assert "error: stopped at step 2: 2 steps skipped" in capsys.readouterr().err


def test_the_consecutive_bound_stops_the_run(tiny, nan_at):
    nan_at({1, 2, 3})
    config = _config(
        tiny,
        "optimizer.name=galore",
        "optimizer.nonfinite=skip",
        "optimizer.max_consecutive_skips=2",
        "run.max_steps=6",
    )
    with pytest.raises(
        FloatingPointError, match=r"stopped at step 4: 3 steps skipped \(3 in a row\).*max_consecutive"
    ):
        train(config, log=lambda line: None)
    assert not (Path(config.run.output_dir) / "summary.json").exists()


def test_the_total_bound_stops_the_run(tiny, nan_at):
    nan_at({0, 2})
    config = _config(
        tiny,
        "optimizer.name=galore",
        "optimizer.layerwise=true",
        "optimizer.nonfinite=skip",
        "optimizer.max_skipped_steps=1",
        "run.max_steps=6",
    )
    with pytest.raises(FloatingPointError, match=r"stopped at step 3: 2 steps skipped.*optimizer.max_skipped_steps=1"):
        train(config, log=lambda line: None)


def test_raise_still_stops_at_the_first_nan(tiny, nan_at):
    nan_at({1})
    config = _config(tiny, "optimizer.name=adamw", "run.max_steps=4")
    with pytest.raises(FloatingPointError, match=r"became nan at step 2.*optimizer.nonfinite=skip"):
        train(config, log=lambda line: None)


def test_skipped_counts_survive_a_resume(tiny, nan_at):
    nan_at({1})
    common = ["optimizer.name=galore", "optimizer.nonfinite=skip", "run.max_steps=4"]
    train(_config(tiny, *common, "run.save_every=2"), stop_after=3, log=lambda line: None)
    summary = train(_config(tiny, *common), resume=True, log=lambda line: None)
    assert summary["skipped_steps"] == 1
