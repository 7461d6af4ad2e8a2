"""FSDP2 runs of the training recipe (issue 22): 2 gloo processes under ``run.parallel=fsdp2`` train as one process
with the whole global batch, write sharded DCP checkpoints in the run-folder layout, resume bit-identically on the
same number of processes and within float-summation tolerance on another, and export one HF folder; layer-wise
steps (``optimizer.layerwise``) included."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from lowrank_train.data.cache import CACHE_ENV_VAR
from lowrank_train.train import ConfigError, load_config, train
from lowrank_train.train.checkpoint import CheckpointError, resolve_checkpoints, verify_checkpoint
from lowrank_train.train.export import export_checkpoint
from lowrank_train.train.parallel import choose_engine

_spec = importlib.util.spec_from_file_location("torchrun_runs", Path(__file__).with_name("torchrun_runs.py"))
_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_runs)
REPO, DEMO = _runs.REPO, _runs.DEMO
_torchrun, _losses, _weights = _runs.torchrun_pretrain, _runs.losses, _runs.weights
QUIET = {"log": lambda line: None}
GALORE = ["optimizer.name=galore", "optimizer.weight_bits=null"]
# Clipped by the previous step's global norm (reduced over the shards; a resume restores it).
LAYERWISE = [*GALORE, "optimizer.layerwise=true", "data.grad_accum=2", "optimizer.max_grad_norm=0.5"]
STEPS = ["run.max_steps=4", "run.eval_every=2", "run.save_every=2", "run.keep_checkpoints=2"]


def _assert_same_run(output: Path, reference: Path, *, exact: bool = False) -> None:
    for split in ("train", "eval"):
        got, expected = _losses(output, split), _losses(reference, split)
        assert got.keys() == expected.keys(), split
        for step in expected:
            if exact:
                assert got[step] == expected[step], (split, step)
            else:
                assert got[step] == pytest.approx(expected[step], rel=1e-5), (split, step)
    got, expected = _weights(output), _weights(reference)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if exact:
            assert torch.equal(got[name], value), name
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _interrupt_after_step_2(run: Path) -> None:
    """As if killed after the step-2 checkpoint: the later checkpoint, summary and model are gone."""
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()


@pytest.fixture(scope="module")
def galore_runs(train_cache, tiny_overrides, tmp_path_factory):
    """GaLore (exact SVD basis, fp32) 4 steps: 2 FSDP2 processes with micro-batch 2, one process with 4."""
    root = tmp_path_factory.mktemp("fsdp2")
    runs = {"fsdp2": root / "fsdp2", "single": root / "single"}
    common = [*tiny_overrides, *GALORE, *STEPS]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV_VAR, str(train_cache))
        done = _torchrun([*common, "run.parallel=fsdp2", f"run.output_dir={runs['fsdp2']}"])
        train(load_config(DEMO, [*common, "data.batch_size=4", f"run.output_dir={runs['single']}"]), **QUIET)
    runs["log"] = done.stdout + done.stderr
    return runs


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


def test_galore_under_fsdp2_trains_as_one_process(galore_runs):
    fsdp2, single = galore_runs["fsdp2"], galore_runs["single"]
    _assert_same_run(fsdp2, single)
    assert "engine: fsdp2 on 2 processes (run.parallel=fsdp2)" in galore_runs["log"]
    assert galore_runs["log"].count("done: 4 steps") == 1  # rank 0 alone logs
    # A sharded checkpoint: every rank's DCP file, checksummed in meta.json, next to the replicated state.pt.
    folder = fsdp2 / "checkpoints" / "step-00000004"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["sharded"] == {"engine": "fsdp2", "format": "dcp/1", "world_size": 2}
    assert set(meta["files"]) == {"state.pt", "shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"}
    assert "model" not in torch.load(folder / "state.pt", weights_only=True)
    assert (fsdp2 / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    # DCP holds global tensors: the projected (r x m) moments of the (64 x 32) gate/up weights in 2 column pieces,
    # the (r x n) ones of the (32 x 64) down weights once (replicated), the embedding's moments in 2 row pieces.
    metadata = dcp.FileSystemReader(folder / "shards").read_metadata().state_dict_metadata
    layouts = {
        (tuple(entry.size), len(entry.chunks))
        for key, entry in metadata.items()
        if key.startswith("optimizer.base.") and key.endswith(".exp_avg")
    }
    assert {((8, 64), 2), ((8, 64), 1), ((50257, 32), 2)} <= layouts, layouts


def test_adamw_under_fsdp2_trains_as_one_process(tiny, tmp_path):
    # torch's AdamW on the DTensor shards, 2 micro-batches accumulated in the sharded gradients, clipped by the
    # global norm (clip_grad_norm_ reduces over the shards).
    steps = [*tiny, "optimizer.name=adamw", "optimizer.weight_bits=null", "run.max_steps=3", "run.save_every=3"]
    steps += ["data.grad_accum=2", "optimizer.max_grad_norm=0.5"]
    _torchrun([*steps, "run.parallel=fsdp2", f"run.output_dir={tmp_path / 'fsdp2'}"])
    train(load_config(DEMO, [*steps, "data.batch_size=4", f"run.output_dir={tmp_path / 'single'}"]), **QUIET)
    _assert_same_run(tmp_path / "fsdp2", tmp_path / "single")


def test_apollo_under_fsdp2_trains_and_resumes_as_one_process(tiny, tmp_path):
    # APOLLO's channel scales and its norm-growth limiter reduced over the shards; the limiter's previous norm is
    # optimizer state, so a 2 -> 1 resume from the sharded step-2 checkpoint continues the one-process run.
    steps = [*tiny, "optimizer.name=apollo", "optimizer.weight_bits=null", "optimizer.rank=4", *STEPS]
    _torchrun([*steps, "run.parallel=fsdp2", f"run.output_dir={tmp_path / 'fsdp2'}"])
    single = [*steps, "data.batch_size=4"]
    train(load_config(DEMO, [*single, f"run.output_dir={tmp_path / 'single'}"]), **QUIET)
    _assert_same_run(tmp_path / "fsdp2", tmp_path / "single")
    run = _copy(tmp_path / "fsdp2", tmp_path / "resumed")
    _interrupt_after_step_2(run)
    train(load_config(DEMO, [*single, f"run.output_dir={run}"]), resume=True, **QUIET)
    _assert_same_run(run, tmp_path / "single")


def test_resume_on_the_same_world_size_is_bit_identical(galore_runs, tmp_path, tiny_overrides):
    run = _copy(galore_runs["fsdp2"], tmp_path)
    _interrupt_after_step_2(run)
    _torchrun([*tiny_overrides, *GALORE, *STEPS, "run.parallel=fsdp2", f"run.output_dir={run}"], "--resume")
    _assert_same_run(run, galore_runs["fsdp2"], exact=True)


def test_a_sharded_checkpoint_resumes_in_one_process(galore_runs, tmp_path, tiny_overrides, monkeypatch, train_cache):
    # 2 -> 1: DCP assembles every tensor (the projected moments of m > n weights were split by columns) in a
    # process without a process group; micro-batch 4 keeps the global batch.
    monkeypatch.setenv(CACHE_ENV_VAR, str(train_cache))
    run = _copy(galore_runs["fsdp2"], tmp_path)
    _interrupt_after_step_2(run)
    lines: list[str] = []
    config = load_config(DEMO, [*tiny_overrides, *GALORE, *STEPS, "data.batch_size=4", f"run.output_dir={run}"])
    train(config, resume=True, log=lines.append)
    assert any("2 -> 1 processes, data.batch_size 2 -> 4: the same global batch of 4 rows" in line for line in lines)
    _assert_same_run(run, galore_runs["single"])


def test_a_single_process_checkpoint_resumes_under_fsdp2(galore_runs, tmp_path, tiny_overrides):
    # 1 -> 2: the whole state.pt is split, each rank keeping its rows (and its columns of the projected moments).
    run = _copy(galore_runs["single"], tmp_path)
    _interrupt_after_step_2(run)
    _torchrun([*tiny_overrides, *GALORE, *STEPS, "run.parallel=fsdp2", f"run.output_dir={run}"], "--resume")
    _assert_same_run(run, galore_runs["single"])


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_four(galore_runs, tmp_path, tiny_overrides):
    run = _copy(galore_runs["fsdp2"], tmp_path)
    _interrupt_after_step_2(run)
    overrides = [*tiny_overrides, *GALORE, *STEPS, "data.batch_size=1", "run.parallel=fsdp2", f"run.output_dir={run}"]
    _torchrun(overrides, "--resume", nproc=4)
    _assert_same_run(run, galore_runs["single"])


@pytest.fixture(scope="module")
def layerwise_runs(train_cache, tiny_overrides, tmp_path_factory):
    """Layer-wise GaLore with 2 micro-batches per step and clipping, 4 steps: 2 FSDP2 processes with micro-batch 2
    (one torchrun launch), one process with 4."""
    root = tmp_path_factory.mktemp("fsdp2_layerwise")
    runs = {"fsdp2": root / "fsdp2", "single": root / "single"}
    common = [*tiny_overrides, *LAYERWISE, *STEPS]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV_VAR, str(train_cache))
        done = _torchrun([*common, "run.parallel=fsdp2", f"run.output_dir={runs['fsdp2']}"])
        train(load_config(DEMO, [*common, "data.batch_size=4", f"run.output_dir={runs['single']}"]), **QUIET)
    runs["log"] = done.stdout + done.stderr
    return runs


def test_layerwise_galore_under_fsdp2_trains_as_one_process(layerwise_runs):
    # Each shard stepped inside backward after its reduce-scatter, the 2 micro-batches accumulated in the projected
    # (r x n) accumulators: the single-process layer-wise run on the same global batch.
    _assert_same_run(layerwise_runs["fsdp2"], layerwise_runs["single"])
    assert "optimizer galore (layer-wise)" in layerwise_runs["log"]
    assert "engine: fsdp2 on 2 processes (run.parallel=fsdp2)" in layerwise_runs["log"]
    # The inner optimizers' states as global tensors: the projected moments of the (64 x 32) gate/up weights in 2
    # column pieces, those of the (32 x 64) down weights once, the embedding's moments in 2 row pieces; the engine's
    # counters in state.pt.
    folder = layerwise_runs["fsdp2"] / "checkpoints" / "step-00000004"
    metadata = dcp.FileSystemReader(folder / "shards").read_metadata().state_dict_metadata
    layouts = {
        (tuple(entry.size), len(entry.chunks))
        for key, entry in metadata.items()
        if re.fullmatch(r"optimizer\.inner\.\d+\.base\.0\.exp_avg", key)
    }
    assert {((8, 64), 2), ((8, 64), 1), ((50257, 32), 2)} <= layouts, layouts
    engine = torch.load(folder / "state.pt", weights_only=True)["optimizer_rest"]["layerwise"]
    assert int(engine["steps"]) == 4
    # Step 3 is clipped by step 2's norm, which the resumes below restore from the step-2 checkpoint.
    step_2 = torch.load(folder.parent / "step-00000002" / "state.pt", weights_only=True)
    assert float(step_2["optimizer_rest"]["layerwise"]["last_grad_norm"]) > 0.5


def test_layerwise_fsdp2_resume_on_the_same_world_size_is_bit_identical(layerwise_runs, tmp_path, tiny_overrides):
    run = _copy(layerwise_runs["fsdp2"], tmp_path)
    _interrupt_after_step_2(run)
    _torchrun([*tiny_overrides, *LAYERWISE, *STEPS, "run.parallel=fsdp2", f"run.output_dir={run}"], "--resume")
    _assert_same_run(run, layerwise_runs["fsdp2"], exact=True)


def test_a_layerwise_sharded_checkpoint_resumes_in_one_process(
    layerwise_runs, tmp_path, tiny_overrides, monkeypatch, train_cache
):
    # 2 -> 1: a plain single-process layer-wise run continues from the sharded inner states (DCP assembles the
    # column pieces of the projected moments and the row pieces of the plain ones).
    monkeypatch.setenv(CACHE_ENV_VAR, str(train_cache))
    run = _copy(layerwise_runs["fsdp2"], tmp_path)
    _interrupt_after_step_2(run)
    config = load_config(DEMO, [*tiny_overrides, *LAYERWISE, *STEPS, "data.batch_size=4", f"run.output_dir={run}"])
    train(config, resume=True, **QUIET)
    _assert_same_run(run, layerwise_runs["single"])


@pytest.mark.slow
def test_a_single_process_layerwise_checkpoint_resumes_under_fsdp2(layerwise_runs, tmp_path, tiny_overrides):
    # 1 -> 2: each inner optimizer's whole state from state.pt, split as the shards are.
    run = _copy(layerwise_runs["single"], tmp_path)
    _interrupt_after_step_2(run)
    _torchrun([*tiny_overrides, *LAYERWISE, *STEPS, "run.parallel=fsdp2", f"run.output_dir={run}"], "--resume")
    _assert_same_run(run, layerwise_runs["single"])


def test_a_resume_that_would_change_the_global_batch_is_refused(galore_runs, tmp_path, tiny_overrides):
    run = _copy(galore_runs["fsdp2"], tmp_path)
    config = load_config(DEMO, [*tiny_overrides, *GALORE, *STEPS, f"run.output_dir={run}"])
    with pytest.raises(ValueError, match=r"global batch is 4 rows \(2 processes x data.batch_size=2\).*batch_size=4"):
        train(config, resume=True, **QUIET)


def test_export_of_a_sharded_run_writes_one_hf_folder(galore_runs, tmp_path):
    out = export_checkpoint(galore_runs["fsdp2"], out=tmp_path / "exported")
    got, expected = load_file(out / "model.safetensors"), _weights(galore_runs["fsdp2"])
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_a_checkpoint_missing_a_rank_is_rejected(galore_runs, tmp_path):
    run = _copy(galore_runs["fsdp2"], tmp_path)
    folder = run / "checkpoints" / "step-00000004"
    (folder / "shards" / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"written by 1 of the 2 ranks .*missing: rank 1.*rejected"):
        verify_checkpoint(folder)
    # Also when meta.json itself never heard of that rank's file (a writer that lost track of it).
    meta = json.loads((folder / "meta.json").read_text())
    del meta["files"]["shards/__1_0.distcp"]
    (folder / "meta.json").write_text(json.dumps(meta))
    resolved = resolve_checkpoints(run)
    assert resolved.folder == run / "checkpoints" / "step-00000002"
    assert (run / "checkpoints" / "rejected-step-00000004").is_dir()
    assert "written by 1 of the 2 ranks" in resolved.rejected[0][1]


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["optimizer.name=qgalore"], "optimizer.weight_bits=8"),
        (["optimizer.name=galore8bit", "optimizer.weight_bits=null"], "optimizer.name='galore8bit'"),
        ([*GALORE, "optimizer.dense_state_bits=8"], "optimizer.dense_state_bits=8"),
    ],
)
def test_combinations_fsdp2_does_not_support_are_refused(overrides, keys, monkeypatch):
    with pytest.raises(ConfigError, match=rf"run.parallel=fsdp2: .*{keys}.*use run.parallel=ddp"):
        load_config(DEMO, [*overrides, "run.parallel=fsdp2"])
    # auto picks DDP for them under torchrun, and says why.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    engine, reason = choose_engine(load_config(DEMO, [*overrides, "run.parallel=auto"]))
    assert engine == "ddp"
    assert "FSDP2 does not support this run" in reason and keys in reason


def test_auto_picks_fsdp2_for_several_processes(monkeypatch):
    config = load_config(DEMO, GALORE)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert choose_engine(config)[0] == "none"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert choose_engine(config) == ("fsdp2", "run.parallel=auto, WORLD_SIZE=2")
    assert choose_engine(load_config(DEMO, LAYERWISE))[0] == "fsdp2"  # layer-wise runs sharded too
    with pytest.raises(ConfigError, match="runs under DDP only"):
        choose_engine(load_config(DEMO, [*GALORE, "run.parallel=fsdp2"]), "finetune")
    assert choose_engine(load_config(DEMO, GALORE), "finetune")[0] == "ddp"


def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes(
    galore_runs, tmp_path, tiny_overrides, monkeypatch, train_cache
):
    # Rank 1 is SIGKILLed as step 3 starts (the test hook); rank 0, inside the step's collectives, ends with one
    # line naming the last complete checkpoint. The subprocess timeout bounds the wait: a hang fails the test.
    run = tmp_path / "run"
    overrides = [*tiny_overrides, *GALORE, *STEPS, "run.parallel=fsdp2", f"run.output_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", CACHE_ENV_VAR: str(train_cache)}
    env.update(LOWRANK_TRAIN_KILL_RANK="1:3", LOWRANK_TRAIN_COLLECTIVE_TIMEOUT="60")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, "-m", "lowrank_train", "pretrain", str(DEMO), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
    )
    assert done.returncode != 0
    step_2 = run / "checkpoints" / "step-00000002"
    assert "rank 0 of 2: a collective failed (" in done.stderr, done.stderr[-3000:]
    assert f"the last complete checkpoint is {step_2}. Resume with: torchrun --nproc_per_node 2" in done.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == [step_2.name]
    # The last complete checkpoint resumes (here in one process with the same global batch).
    monkeypatch.setenv(CACHE_ENV_VAR, str(train_cache))
    config = load_config(DEMO, [*tiny_overrides, *GALORE, *STEPS, "data.batch_size=4", f"run.output_dir={run}"])
    train(config, resume=True, **QUIET)
    _assert_same_run(run, galore_runs["single"])
