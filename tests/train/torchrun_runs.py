"""What the multi-process recipe tests share: launching ``pretrain`` under torchrun and reading a run folder."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowrank_train.train import read_metrics

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes/configs/demo.yaml"


def torchrun_pretrain(overrides: list[str], *flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``pretrain`` of the demo recipe on ``nproc`` gloo processes; asserts it succeeded (with its output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    done = subprocess.run(
        [*command, "-m", "lowrank_train", "pretrain", str(DEMO), *overrides, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def losses(output: Path, split: str) -> dict[int, float]:
    """``{step: loss}`` of one split of a run's metrics; each step recorded once."""
    records = [r for r in read_metrics(output) if r["split"] == split]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{split} records written more than once: {steps}"
    return {r["step"]: r["loss"] for r in records}


def weights(output: Path) -> dict[str, torch.Tensor]:
    """The run's exported model tensors."""
    return load_file(output / "model" / "model.safetensors")
