"""Data-parallel runs under torchrun (issue 22, first step): 2 gloo processes with micro-batch b train exactly as
one process with micro-batch 2b, write the run folder once, and resume under torchrun; ``run.parallel`` is
validated; INT8 (Q-GaLore) runs keep bit-identical codes on every rank."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from lowrank_train.train import ConfigError, load_config, train
from lowrank_train.train.metrics import METRICS_FILE

_spec = importlib.util.spec_from_file_location("torchrun_runs", Path(__file__).with_name("torchrun_runs.py"))
_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_runs)
REPO, DEMO = _runs.REPO, _runs.DEMO
_torchrun, _losses, _weights = _runs.torchrun_pretrain, _runs.losses, _runs.weights
QUIET = {"log": lambda line: None}
# GaLore (exact SVD basis) in fp32: the DDP mean of two half-batch gradients differs from the full-batch gradient
# only by summation order.
COMMON = ["optimizer.name=galore", "optimizer.weight_bits=null", "run.max_steps=4", "run.eval_every=2"]


def _assert_same_run(output: Path, reference: Path) -> None:
    for split in ("train", "eval"):
        got, expected = _losses(output, split), _losses(reference, split)
        assert got.keys() == expected.keys(), split
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-5), (split, step)
    got, expected = _weights(output), _weights(reference)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_train_as_one_with_twice_the_batch(tiny, tmp_path):
    # The tiny overrides have data.batch_size=2: each of the 2 ranks reads 2 rows of every 4-row global batch.
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = _torchrun([*tiny, *COMMON, "run.save_every=2", f"run.output_dir={ddp}"])
    train(load_config(DEMO, [*tiny, *COMMON, "data.batch_size=4", f"run.output_dir={single}"]), **QUIET)
    _assert_same_run(ddp, single)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["tokens"] == json.loads((single / "summary.json").read_text())["tokens"]
    # Written once, by rank 0: one run folder's files, one line per step, one "done" line.
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-00000004"]
    assert (ddp / METRICS_FILE).read_text().count('"split": "train"') == 4
    assert done.stdout.count("done: 4 steps") + done.stderr.count("done: 4 steps") == 1


def test_layerwise_with_accumulation_averages_in_the_engine(tiny, tmp_path):
    # No DDP wrapper: LayerwiseOptimizer averages each gradient over the ranks in its backward hook (the ddp engine;
    # auto would shard a layer-wise run with FSDP2, tested in test_fsdp2_recipe.py).
    steps = [*tiny, *COMMON, "optimizer.layerwise=true", "data.grad_accum=2"]
    _torchrun([*steps, "run.parallel=ddp", f"run.output_dir={tmp_path / 'ddp'}"])
    train(load_config(DEMO, [*steps, "data.batch_size=4", f"run.output_dir={tmp_path / 'single'}"]), **QUIET)
    _assert_same_run(tmp_path / "ddp", tmp_path / "single")


def test_a_torchrun_run_resumes_under_torchrun(tiny, tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    steps = [*tiny, *COMMON, "run.save_every=2", "run.keep_checkpoints=2"]
    train(load_config(DEMO, [*steps, "data.batch_size=4", f"run.output_dir={reference}"]), **QUIET)
    _torchrun([*steps, f"run.output_dir={run}"])
    # As if killed after the step-2 checkpoint: the later checkpoint, summary and model are gone.
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    _torchrun([*steps, f"run.output_dir={run}"], "--resume")
    _assert_same_run(run, reference)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.parallel=fsdp2"], r"run.parallel=fsdp2: INT8 weights .* use run.parallel=ddp"),  # the demo is Q-GaLore
        (["run.parallel=zero"], "run.parallel must be one of auto, none, ddp, fsdp2"),
    ],
)
def test_run_parallel_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, overrides)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_ddp_outside_torchrun_is_refused(tiny, monkeypatch, engine):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match=f"run.parallel={engine} needs the torchrun environment"):
        train(load_config(DEMO, [*tiny, *COMMON, f"run.parallel={engine}"]), **QUIET)


def _checkpoint_model(output: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(output / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=True)["model"]


@pytest.mark.parametrize(("name", "layerwise"), [("qgalore", False), ("qapollo_mini", False), ("qgalore", True)])
def test_int8_weights_under_ddp_match_one_process(tiny, tmp_path, name, layerwise):
    # INT8 QuantLinear weights, written back with (seed, step)-seeded stochastic rounding: DDP averages the dense
    # carrier gradients; the run checks at the end (Ranks.check_replicas, all_gather) that every rank holds
    # bit-identical codes, scales and floats, and fails otherwise.
    # Layer-wise (the 7B recipes' setting): no DDP wrapper, the engine all-reduces each carrier gradient itself.
    steps = [*tiny, f"optimizer.name={name}", "optimizer.weight_bits=8", "run.max_steps=4", "run.save_every=4"]
    steps.append(f"optimizer.layerwise={str(layerwise).lower()}")
    _torchrun([*steps, f"run.output_dir={tmp_path / 'ddp'}"])
    train(load_config(DEMO, [*steps, "data.batch_size=4", f"run.output_dir={tmp_path / 'single'}"]), **QUIET)
    for split in ("train", "eval"):
        got, expected = _losses(tmp_path / "ddp", split), _losses(tmp_path / "single", split)
        assert got == pytest.approx(expected, rel=1e-5), split
    got, expected = _checkpoint_model(tmp_path / "ddp", 4), _checkpoint_model(tmp_path / "single", 4)
    codes = [key for key in expected if key.endswith("weight_codes")]
    assert codes and got.keys() == expected.keys()
    # Summation order in the all-reduce may flip a rounding decision, by one code at most: allow 0.1% of codes.
    differing = sum(int(got[key].ne(expected[key]).sum()) for key in codes)
    assert differing <= 1e-3 * sum(expected[key].numel() for key in codes), differing
    for key in codes:
        assert (got[key].int() - expected[key].int()).abs().max() <= 1, key
    for key in set(expected) - set(codes):
        # Float weights (embeddings, norms, AdamW) see the same order effect through Adam's normalization.
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-3, msg=key)


def test_check_replicas_names_what_differs(monkeypatch):
    # Two fake ranks: rank 1's copy of one buffer differs by one bit.
    from torch import nn

    from lowrank_train.train import parallel

    model = nn.Linear(2, 2)
    model.register_buffer("codes", torch.zeros(4, dtype=torch.int8))
    other = [parallel.fingerprint(t).clone() for t in [*model.parameters(), *model.buffers()]]
    other[-1] = parallel.fingerprint(torch.tensor([0, 0, 1, 0], dtype=torch.int8))

    def all_gather(out: list[torch.Tensor], local: torch.Tensor) -> None:
        out[0].copy_(local)
        out[1].copy_(torch.stack(other))

    monkeypatch.setattr(parallel.dist, "all_gather", all_gather)
    with pytest.raises(RuntimeError, match=r"differ in 1 of 3 tensors \(first: codes\)"):
        parallel.Ranks(0, 2).check_replicas(model)
    other[-1] = parallel.fingerprint(model.codes)
    parallel.Ranks(0, 2).check_replicas(model)
