"""Fault injection on a real ``lowrank-train pretrain`` process (issue 12, "Done when").

One run folder is killed again and again: with the checkpoint fault hook (LOWRANK_TRAIN_FAULT, os._exit(137)
inside a save: while state.pt is written, after the commit rename before ``latest``, after ``latest``) and with
SIGKILLs at random moments of training, each time resumed with ``--resume``. The end state must equal an
uninterrupted run's bit for bit, and so must every train loss it logged. (Same-step re-saves, which the loop no
longer makes, are killed at each of their points in tests/train/test_checkpoint.py.)
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowrank_train.data.cache import CACHE_ENV_VAR
from lowrank_train.train import latest_checkpoint, load_state, read_metrics
from lowrank_train.train.checkpoint import FAULT_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes/configs/demo.yaml"
MAX_STEPS = 8
TINY = [
    f"run.max_steps={MAX_STEPS}",
    "run.log_every=1",
    "run.eval_every=4",
    "run.eval_batches=1",
    "run.save_every=1",
    "run.device=cpu",
    "run.num_threads=1",
    "run.memory_table=false",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=32",
    "data.max_documents=1",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.heldout_fraction=0.05",
    "optimizer.name=qgalore",
    "optimizer.rank=8",
    "optimizer.update_gap=2",
    "schedule.warmup_steps=1",
]


def _command(output, *extra):
    return [
        sys.executable,
        "-m",
        "lowrank_train.cli",
        "pretrain",
        str(DEMO),
        *TINY,
        f"run.output_dir={output}",
        *extra,
    ]


def _env(cache, fault=None):
    env = {**os.environ, CACHE_ENV_VAR: str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(FAULT_ENV_VAR, None)
    if fault:
        env[FAULT_ENV_VAR] = fault
    return env


def _run(output, cache, *extra, fault=None):
    return subprocess.run(_command(output, *extra), env=_env(cache, fault), cwd=REPO, capture_output=True, timeout=300)


def _kill_at_random(output, cache, rng, *extra):
    """Start a (resumed) run and SIGKILL it a random moment after it has logged a random train step."""
    process = subprocess.Popen(
        _command(output, *extra), env=_env(cache), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    target = rng.randint(1, 3)
    seen = 0
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(b"step "):
            seen += 1
            if seen == target:
                time.sleep(rng.uniform(0.0, 0.4))
                process.send_signal(signal.SIGKILL)
                break
    process.wait(timeout=120)
    return process.returncode


@pytest.mark.slow
def test_killed_and_resumed_runs_end_bit_identical_to_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    straight = tmp_path / "straight"
    assert _run(straight, cache).returncode == 0

    run = tmp_path / "killed"
    rng = random.Random(12)
    outcomes = []
    # the 2nd save of the first process dies while writing state.pt; then a resume dies right after its commit
    # rename (before `latest`), another after `latest`, then two random SIGKILLs; the last resume finishes.
    result = _run(run, cache, fault="during-state:2")
    outcomes.append(("during-state:2", result.returncode))
    for fault in ("after-rename:2", "after-latest:1"):
        result = _run(run, cache, "--resume", fault=fault)
        assert result.returncode == 137, (fault, result.stderr.decode()[-3000:])
        outcomes.append((fault, result.returncode))
    for _ in range(2):
        outcomes.append(("SIGKILL", _kill_at_random(run, cache, rng, "--resume")))
    final = _run(run, cache, "--resume")
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    assert [code for _, code in outcomes[:3]] == [137, 137, 137], outcomes
    assert all(code in (-signal.SIGKILL, 0) for _, code in outcomes[3:]), outcomes

    expected = load_state(latest_checkpoint(straight))
    got = load_state(latest_checkpoint(run))
    assert int(got["step"]) == int(expected["step"]) == MAX_STEPS
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=0, msg=name)
    losses = {r["step"]: r["loss"] for r in read_metrics(straight) if r["split"] == "train"}
    resumed = {r["step"]: r["loss"] for r in read_metrics(run) if r["split"] == "train"}
    assert resumed == losses
    evals = [r["step"] for r in read_metrics(run) if r["split"] == "eval"]
    assert evals == sorted(set(evals))  # no duplicate eval record
