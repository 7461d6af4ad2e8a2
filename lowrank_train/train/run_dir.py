"""The run folder and its checkpoint policy: fresh start, overwrite or resume; what a checkpoint holds; RNG states.

A run writes into ``run.output_dir``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (atomic, see
:mod:`lowrank_train.train.checkpoint`), ``summary.json`` and, for ``compress`` / ``finetune``, ``model/``.

Checkpoints are loaded to the CPU, whatever the run's device: ``load_state_dict`` moves model and optimizer state
to their parameters' devices, and the RNG states stay the CPU ByteTensors that ``torch.set_rng_state`` and
``torch.cuda.set_rng_state`` require (issue 13: loading with ``map_location=cuda`` broke every GPU resume).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from lowrank_train.train.checkpoint import checkpoint_root, latest_checkpoint, load_state, read_meta, save_checkpoint
from lowrank_train.train.config import TrainConfig
from lowrank_train.train.config_schema import flatten

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"


# Keys that may differ between a run and the run that resumes it: where it writes and how it reports.
RESUMABLE_DIFFERENCES = frozenset(
    {
        "run.output_dir",
        "run.log_every",
        "run.eval_every",
        "run.eval_batches",
        "run.save_every",
        "run.keep_checkpoints",
        "run.save_final",
        "run.device",
        "run.num_threads",
        "run.metrics",
        "run.memory_table",
        "run.check_memory",
        "run.overwrite",
        "data.cache_dir",
    }
)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two ``to_dict()`` configs, except those a resume may change.

    Returns:
        ``{key: (saved value, current value)}``.
    """
    flat_saved, flat_current = flatten(saved), flatten(current)
    keys = (set(flat_saved) | set(flat_current)) - RESUMABLE_DIFFERENCES
    return {
        k: (flat_saved.get(k), flat_current.get(k)) for k in sorted(keys) if flat_saved.get(k) != flat_current.get(k)
    }


def config_fingerprint(config: TrainConfig) -> str:
    """A hash of every setting that must match for a resume to continue the same run."""
    flat = {k: v for k, v in flatten(config.to_dict()).items() if k not in RESUMABLE_DIFFERENCES}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


class ResumeError(ValueError):
    """A resume that cannot continue the same run (no checkpoint, or one written with a different config)."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: optimizer steps done, tokens seen, training seconds so far."""

    step: int
    tokens: int
    train_seconds: float


def prepare_output_dir(config: TrainConfig, resume: bool) -> tuple[Path, Path | None]:
    """Checks the run folder against ``resume`` / ``run.overwrite`` and writes ``config.yaml`` into it.

    Returns:
        ``(run folder, checkpoint folder to resume from or None)``.

    Raises:
        ResumeError: ``resume`` without a checkpoint or with one of a different config; a folder that holds
            checkpoints, without ``resume`` or ``run.overwrite``.
    """
    output = Path(config.run.output_dir)
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(output)
        if resume_from is None:
            raise ResumeError(
                f"--resume: {output} holds no checkpoint to resume from (looked in {checkpoint_root(output)})"
            )
        differences = config_differences(read_meta(resume_from)["config"], config.to_dict())
        if differences:
            listed = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in differences.items())
            raise ResumeError(
                f"--resume: the checkpoint in {resume_from} was written by a different config ({listed}). Resume "
                "with the same config, or start a new run in another run.output_dir"
            )
    elif latest_checkpoint(output) is not None:
        if not config.run.overwrite:
            raise ResumeError(
                f"{output} already holds checkpoints: pass --resume to continue that run, run.overwrite=true to "
                "start again from scratch (deleting them), or choose another run.output_dir"
            )
        shutil.rmtree(checkpoint_root(output))
    output.mkdir(parents=True, exist_ok=True)
    (output / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    return output, resume_from


def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG states a run depends on: the CPU generator's, and the device's on CUDA (CPU ByteTensors)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Sets the states :func:`capture_rng` returned; they are brought back to CPU ByteTensors first."""
    torch.set_rng_state(_cpu_bytes(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_cpu_bytes(state["cuda"]), device)


def _cpu_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # torch's RNG setters accept only CPU uint8 tensors, whatever device the state describes.
    return tensor.detach().to(device="cpu", dtype=torch.uint8)


def checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    step: int,
    tokens: int,
    train_seconds: float,
) -> dict[str, Any]:
    """Everything a resume needs, as tensors and plain containers (loads with ``weights_only=True``)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng(device),
        "step": torch.tensor(step),
        "tokens": torch.tensor(tokens),
        "train_seconds": torch.tensor(train_seconds, dtype=torch.float64),
    }


def save_run_checkpoint(output: Path, config: TrainConfig, mode: str, state: dict[str, Any]) -> Path:
    """Writes ``state`` (from :func:`checkpoint_state`) with the meta a resume checks: step, config, fingerprint."""
    step = int(state["step"])
    meta = {"step": step, "mode": mode, "fingerprint": config_fingerprint(config), "config": config.to_dict()}
    return save_checkpoint(output, step, state, meta, keep=config.run.keep_checkpoints)


def restore_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> ResumePoint:
    """Loads a checkpoint folder into ``model`` and ``optimizer`` (on any device) and restores the RNG states.

    The file is always read to the CPU (see the module docstring); ``device`` only selects which RNG states
    are restored.
    """
    state = load_state(folder, map_location="cpu")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"], device)
    return ResumePoint(
        step=int(state["step"]), tokens=int(state["tokens"]), train_seconds=float(state["train_seconds"])
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A sorted, indented JSON file (``summary.json``)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model_folder(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A WeLore model with its tokenizer, loadable as ``model.pretrained`` (``compress`` and ``finetune`` output)."""
    from lowrank_train.welore import save_compressed

    save_compressed(model, folder)
    tokenizer.save_pretrained(folder)
