"""Atomic checkpoints: each save goes to a private folder that is renamed into place, then ``latest`` is switched.

Layout of a run folder::

    checkpoints/step-00000040/state.pt     model, optimizer, RNG states and step (torch.save, weights_only-safe)
    checkpoints/step-00000040/meta.json    step, config fingerprint, the config itself
    checkpoints/latest                     the name of the newest complete checkpoint folder

A crash at any point of :func:`save_checkpoint` leaves ``latest`` naming the previous complete folder: the new
folder only gets its final name once fully written (``os.replace`` of a folder is atomic on POSIX), and
``latest`` is itself replaced atomically. Partial ``.tmp-*`` folders are ignored and cleaned up on the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


def checkpoint_root(output_dir: str | os.PathLike[str]) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(output_dir) / CHECKPOINTS


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    keep: int = 1,
) -> Path:
    """Write a checkpoint atomically and point ``latest`` at it; then drop all but the ``keep`` newest.

    Args:
        output_dir: the run folder.
        step: optimizer steps done; names the folder.
        state: tensors and plain containers (saved with ``torch.save``; must load with ``weights_only=True``).
        meta: JSON-serialisable description (step, config, fingerprint).
        keep: number of checkpoint folders to keep.

    Returns:
        The final folder of this checkpoint.
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    try:
        torch.save(dict(state), staging / STATE_FILE)
        (staging / META_FILE).write_text(json.dumps(dict(meta), indent=2, sort_keys=True), encoding="utf-8")
        for file in (STATE_FILE, META_FILE):
            _fsync_file(staging / file)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_latest(root, final.name)
        _fsync_dir(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _prune(root, keep=keep, protect=final.name)
    return final


def _write_latest(root: Path, name: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=".latest-", dir=root)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(name + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, root / LATEST)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _prune(root: Path, *, keep: int, protect: str) -> None:
    # Leftovers of interrupted saves are never loaded: remove them.
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in folders[:-keep] if keep > 0 else folders:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder of a run, or ``None`` when it has none."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    if not (folder / STATE_FILE).is_file() or not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is incomplete or missing")
    return folder


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint folder."""
    return json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))


def load_state(folder: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The saved state of a checkpoint folder, loaded with ``weights_only=True`` (no code runs on load)."""
    return torch.load(Path(folder) / STATE_FILE, map_location=map_location, weights_only=True)
