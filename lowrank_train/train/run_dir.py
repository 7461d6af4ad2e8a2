"""The run folder and its checkpoint policy: fresh start, overwrite or resume; what a checkpoint holds; RNG states.

A run writes into ``run.output_dir``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (atomic, see
:mod:`lowrank_train.train.checkpoint`), ``summary.json`` and, for ``compress`` / ``finetune``, ``model/``.

Checkpoints are loaded to the CPU, whatever the run's device: ``load_state_dict`` moves model and optimizer state
to their parameters' devices, and the RNG states stay the CPU ByteTensors that ``torch.set_rng_state`` and
``torch.cuda.set_rng_state`` require (issue 13: loading with ``map_location=cuda`` broke every GPU resume).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lowrank_train.folders import write_text
from lowrank_train.train.checkpoint import (
    CheckpointError,
    checkpoint_root,
    has_checkpoints,
    load_state,
    resolve_checkpoints,
    save_checkpoint,
)
from lowrank_train.train.config import TrainConfig
from lowrank_train.train.config_schema import ConfigError, flatten

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
        "run.parallel",
        "run.num_threads",
        "run.metrics",
        "run.memory_table",
        "run.check_memory",
        "run.overwrite",
        "run.allow_data_change",
        # A larger (or smaller) max_steps continues the run; the schedule is re-stretched (see schedule.py).
        "run.max_steps",
        "data.cache_dir",
    }
    # Issue 20 item 4: settings that leave the checkpoint's state layout as it is. They are recorded in
    # resume_changes.jsonl when a resume changes them.
    | {
        "optimizer.lr",
        "optimizer.max_grad_norm",
        "optimizer.nonfinite",
        "optimizer.max_skipped_steps",
        "optimizer.max_consecutive_skips",
        "schedule.kind",
        "schedule.warmup_steps",
        "schedule.min_lr_ratio",
    }
)
RESUME_CHANGES_FILE = "resume_changes.jsonl"
LOCK_FILE = ".lock"


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two ``to_dict()`` configs, except those a resume may change.

    A key missing from ``saved`` (a checkpoint of an older version) counts as its default.

    Returns:
        ``{key: (saved value, current value)}``.
    """
    flat_saved, flat_current = flatten(saved), flatten(current)
    # A key the saved config lacks came with a later version: that run used what its default means now.
    missing = set(flat_current) - set(flat_saved)
    if missing:
        defaults = flatten(TrainConfig().to_dict())
        flat_saved.update({k: defaults[k] for k in missing if k in defaults})
    keys = (set(flat_saved) | set(flat_current)) - RESUMABLE_DIFFERENCES
    return {
        k: (flat_saved.get(k), flat_current.get(k)) for k in sorted(keys) if flat_saved.get(k) != flat_current.get(k)
    }


def resumable_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The differences a resume accepts (:data:`RESUMABLE_DIFFERENCES`), as ``{key: (saved, current)}``."""
    flat_saved, flat_current = flatten(saved), flatten(current)
    return {
        k: (flat_saved.get(k), flat_current.get(k))
        for k in sorted(RESUMABLE_DIFFERENCES)
        if flat_saved.get(k) != flat_current.get(k)
    }


def record_resume_changes(output: Path, step: int, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Appends one line to ``resume_changes.jsonl``: the step a resume continued from and what it changed."""
    if not changes:
        return
    line = {"step": step, "time": time.time(), "changes": {k: list(v) for k, v in changes.items()}}
    with (output / RESUME_CHANGES_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")


class RunLockedError(ValueError):
    """Another process holds the run folder's lock."""


@contextmanager
def run_folder_lock(output: Path) -> Iterator[None]:
    """Holds an advisory ``fcntl.flock`` on ``<output>/.lock`` for the ``with`` block (one writer per run folder).

    The lock file holds the owner's pid. The kernel releases the lock when its process ends, so a crashed run
    leaves no stale lock; the file itself is left in place.

    Raises:
        RunLockedError: another process holds the lock (its pid is named).
    """
    created = [folder for folder in (output, *output.parents) if not folder.exists()]
    check_output_dir(output)
    handle = (output / LOCK_FILE).open("a+", encoding="utf-8")
    failed = True
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise RunLockedError(
                f"{output} is in use by another run (pid {owner}, lock {output / LOCK_FILE}): wait for it to end, "
                "stop it, or choose another run.output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
        failed = False
    finally:
        handle.close()  # closing the descriptor releases the lock
        if failed and created:
            _remove_if_untouched(output, created)


def _remove_if_untouched(output: Path, created: list[Path]) -> None:
    # A run refused before it wrote anything (e.g. by the memory check) leaves no folder behind: only the folders
    # this process created, and only while they hold nothing but the lock file.
    if {child.name for child in output.iterdir()} <= {LOCK_FILE}:
        (output / LOCK_FILE).unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break


def config_fingerprint(config: TrainConfig) -> str:
    """A hash of every setting that must match for a resume to continue the same run."""
    flat = {k: v for k, v in flatten(config.to_dict()).items() if k not in RESUMABLE_DIFFERENCES}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


class ResumeError(ValueError):
    """A resume that cannot continue the same run (no checkpoint, or one written with a different config)."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues.

    Attributes:
        step: optimizer steps done.
        tokens: tokens seen.
        train_seconds: training seconds so far.
        data: the training batches' ``state_dict`` (``None`` in checkpoints written before it was stored).
        step_losses: ``(step,)`` float64 train loss of every step so far (empty in older checkpoints), so that
            the resumed run's logging windows hold the same steps as the uninterrupted run's, whatever
            ``run.log_every`` is now.
        schedule: the learning-rate segment in force (``start_step``, ``start_factor``, ``max_steps``).
        skipped_steps: steps skipped so far under ``optimizer.nonfinite: skip`` (0 in older checkpoints).
        consecutive_skips: how many of the last steps in a row were skipped.
    """

    step: int
    tokens: int
    train_seconds: float
    data: dict[str, Any] | None = None
    step_losses: list[float] = field(default_factory=list)
    schedule: dict[str, float] | None = None
    skipped_steps: int = 0
    consecutive_skips: int = 0


def check_output_dir(path: Path) -> None:
    """Refuse an output folder that is a file, lies under a file or cannot be written, before anything is built.

    Raises:
        ConfigError: naming ``run.output_dir``, the path and what is wrong with it.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.output_dir={str(path)!r} is a file, not a folder: choose another run.output_dir")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"run.output_dir={str(path)!r} lies under {str(existing)!r}, which is a file: choose another "
            "run.output_dir"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ConfigError(
            f"run.output_dir={str(path)!r} cannot be written ({error.strerror or error}): choose a writable "
            "run.output_dir"
        ) from None


def prepare_output_dir(
    config: TrainConfig, resume: bool, *, log: Callable[[str], None] | None = None, world_size: int = 1
) -> tuple[Path, Path | None]:
    """Checks the run folder against ``resume`` / ``run.overwrite`` and writes ``config.yaml`` into it.

    A resume takes the newest checkpoint that verifies (:func:`~lowrank_train.train.checkpoint.resolve_checkpoints`):
    a missing or stale ``latest``, or a corrupt newest checkpoint with an older one kept, is passed over and said
    in ``log``.

    A resume on another number of processes (``world_size``) keeps the global batch: ``data.batch_size`` may
    change so that ``data.batch_size * world_size`` stays what the checkpoint's run had.

    Returns:
        ``(run folder, checkpoint folder to resume from or None)``.

    Raises:
        ConfigError: an output folder that is a file, lies under a file or cannot be written.
        ResumeError: ``resume`` without a checkpoint or with one of a different config; a folder that holds
            checkpoints, without ``resume`` or ``run.overwrite``.
        CheckpointError: every checkpoint of the run failed verification (each one named).
    """
    output = Path(config.run.output_dir)
    check_output_dir(output)
    resume_from = None
    if resume:
        resolved = resolve_checkpoints(output)
        for note in resolved.notes:
            (log or print)(f"resume: {note}")
        if resolved.folder is None:
            if resolved.rejected:
                listed = "; ".join(reason for _, reason in resolved.rejected)
                raise CheckpointError(
                    f"--resume: no checkpoint in {checkpoint_root(output)} is usable ({listed}). Restore the file, "
                    "or start again with run.overwrite=true"
                )
            raise ResumeError(
                f"--resume: {output} holds no checkpoint to resume from (looked in {checkpoint_root(output)})"
            )
        resume_from = resolved.folder
        differences = config_differences(resolved.meta["config"], config.to_dict())
        _check_global_batch(resolved.meta, config, world_size, differences, log or print)
        if differences:
            listed = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in differences.items())
            raise ResumeError(
                f"--resume: the checkpoint in {resume_from} was written by a different config ({listed}). Resume "
                "with the same config, or start a new run in another run.output_dir"
            )
        step = int(resolved.meta.get("step", -1))
        if step > config.run.max_steps:
            raise ResumeError(
                f"--resume: the checkpoint in {resume_from} is at step {step}, past run.max_steps="
                f"{config.run.max_steps}; pass run.max_steps >= {step}"
            )
        changes = resumable_changes(resolved.meta["config"], config.to_dict())
        changes.pop("run.output_dir", None)  # where the folder is, not how the run goes on
        finished = step >= config.run.max_steps and (output / SUMMARY_FILE).is_file()  # nothing will run
        if changes and not finished:
            record_resume_changes(output, step, changes)
            listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            (log or print)(f"resume: changed since the checkpoint (recorded in {RESUME_CHANGES_FILE}): {listed}")
    elif has_checkpoints(output):
        if not config.run.overwrite:
            raise ResumeError(
                f"{output} already holds checkpoints: pass --resume to continue that run, run.overwrite=true to "
                "start again from scratch (deleting them), or choose another run.output_dir"
            )
        shutil.rmtree(checkpoint_root(output))
    write_text(output / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return output, resume_from


def _check_global_batch(
    meta: Mapping[str, Any],
    config: TrainConfig,
    world_size: int,
    differences: dict[str, tuple[Any, Any]],
    log: Callable[[str], None],
) -> None:
    """Accepts a ``data.batch_size`` change (drops it from ``differences``) when it keeps the checkpoint's global
    batch on ``world_size`` processes; refuses a resume whose global batch would change.

    Raises:
        ResumeError: the global batch (``data.batch_size`` times the processes) differs from the checkpoint's.
    """
    saved_world = meta.get("world_size")
    if saved_world is None:  # checkpoints that did not record it: data.batch_size must match, as before
        return
    saved_batch = int(meta["config"]["data"]["batch_size"])
    saved_global, batch = saved_batch * int(saved_world), config.data.batch_size
    if saved_global != batch * world_size:
        advice = (
            f"set data.batch_size={saved_global // world_size}"
            if saved_global % world_size == 0
            else f"use a number of processes that divides {saved_global}"
        )
        raise ResumeError(
            f"--resume: the checkpoint's global batch is {saved_global} rows ({saved_world} processes x "
            f"data.batch_size={saved_batch}); {world_size} x {batch} = {batch * world_size} would change the batches: "
            f"{advice}"
        )
    if saved_world != world_size:
        differences.pop("data.batch_size", None)
        log(
            f"resume: {saved_world} -> {world_size} processes, data.batch_size {saved_batch} -> {batch}: the same "
            f"global batch of {saved_global} rows"
        )


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
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
    *,
    step: int,
    tokens: int,
    train_seconds: float,
    data: dict[str, Any] | None = None,
    step_losses: list[float] | None = None,
    schedule: Mapping[str, float] | None = None,
    skipped_steps: int = 0,
    consecutive_skips: int = 0,
) -> dict[str, Any]:
    """Everything a resume needs, as tensors and plain containers (loads with ``weights_only=True``).

    Args:
        model: the model (``None`` with ``optimizer``: a sharded checkpoint, whose shards hold both and the RNG).
        data: the training batches' ``state_dict()`` (their position in the data).
        step_losses: the train loss of every step so far (see :class:`ResumePoint`).
        schedule: the learning-rate segment in force (see :func:`lowrank_train.train.schedule.segment_lr_factor`).
        skipped_steps: steps skipped so far (``optimizer.nonfinite: skip``).
        consecutive_skips: the length of the current run of skipped steps.
    """
    state: dict[str, Any] = {
        "step": torch.tensor(step),
        "tokens": torch.tensor(tokens),
        "train_seconds": torch.tensor(train_seconds, dtype=torch.float64),
        "skipped_steps": torch.tensor(skipped_steps),
        "consecutive_skips": torch.tensor(consecutive_skips),
    }
    if model is not None and optimizer is not None:  # a sharded checkpoint keeps these in its DCP shards
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict(), rng=capture_rng(device))
    if data is not None:
        state["data"] = data
    if step_losses is not None:
        state["step_losses"] = torch.tensor(step_losses, dtype=torch.float64)
    if schedule is not None:
        state["schedule"] = {k: torch.tensor(v, dtype=torch.float64) for k, v in schedule.items()}
    return state


def save_run_checkpoint(
    output: Path,
    config: TrainConfig,
    mode: str,
    state: dict[str, Any],
    *,
    data_fingerprint: str | None = None,
    world_size: int = 1,
    staged: Path | None = None,
    extra_files: Mapping[str, Mapping[str, Any]] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``state`` (from :func:`checkpoint_state`) with the meta a resume checks: step, config, fingerprints.

    ``staged``, ``extra_files`` and ``extra_meta`` are a sharded checkpoint's (:mod:`lowrank_train.train.sharded`):
    the staging folder the ranks wrote their shards into, those files' checksums, and the ``sharded`` entry.
    ``world_size`` is the number of processes whose rows make up a global batch.
    """
    step = int(state["step"])
    meta = {"step": step, "mode": mode, "fingerprint": config_fingerprint(config), "config": config.to_dict()}
    meta["world_size"] = world_size  # a resume keeps the global batch (data.batch_size x processes)
    if data_fingerprint is not None:
        meta["data_fingerprint"] = data_fingerprint
    meta.update(extra_meta or {})
    return save_checkpoint(
        output, step, state, meta, keep=config.run.keep_checkpoints, staged=staged, extra_files=extra_files
    )


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
    return resume_point(state)


def resume_point(state: Mapping[str, Any]) -> ResumePoint:
    """The :class:`ResumePoint` of a loaded ``state.pt`` (a single-process or a sharded checkpoint's)."""
    losses = state.get("step_losses")
    schedule = state.get("schedule")
    return ResumePoint(
        step=int(state["step"]),
        tokens=int(state["tokens"]),
        train_seconds=float(state["train_seconds"]),
        data=state.get("data"),
        step_losses=[] if losses is None else losses.tolist(),
        schedule=None if schedule is None else {k: float(v) for k, v in schedule.items()},
        skipped_steps=int(state.get("skipped_steps", 0)),
        consecutive_skips=int(state.get("consecutive_skips", 0)),
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A sorted, indented JSON file (``summary.json``), replaced whole."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
