"""Atomic, checksummed checkpoints: each save goes to a private folder whose rename into place is the commit point.

Layout of a run folder::

    checkpoints/step-00000040/state.pt     model, optimizer, RNG states and step (torch.save, weights_only-safe)
    checkpoints/step-00000040/meta.json    step, config fingerprint, the config, the sha256 of state.pt
    checkpoints/latest                     the name of the newest checkpoint folder (a hint, see below)

An FSDP2 run's checkpoint (:mod:`lowrank_train.train.sharded`) adds ``shards/`` (one DCP file per rank and DCP's
``.metadata``): every rank writes into the staging folder of :func:`stage_checkpoint` before rank 0 commits it,
``meta.json`` records the sha256 of every file and the world size, and :func:`verify_checkpoint` rejects a folder
holding fewer ranks' shards than that.

What survives what (issue 12 items 2 and 3):

* The commit point is one ``os.replace`` of the finished ``.tmp-step-*`` folder onto ``step-N``. A crash before it
  leaves the previous checkpoints as they were; a crash after it leaves ``step-N`` complete. ``latest`` is written
  after the commit; a resume that finds it missing, stale or naming a broken folder takes the newest complete
  ``step-*`` folder instead and says so.
* A re-save of an existing step first renames the old folder aside (``.replaced-step-N-*``), commits the new one,
  then deletes the old one: a crash in between leaves one complete copy, which a resume puts back in place.
* Nothing is pruned before the new checkpoint is committed, and leftover temporary folders of interrupted saves are
  removed by the next save.
* A failed write (full disk, I/O error) raises :class:`CheckpointError` naming the folder, after removing its
  partial files; the previous checkpoint is untouched.
* ``meta.json`` records the sha256 and size of ``state.pt``; :func:`verify_checkpoint` checks them (and that
  ``meta.json`` parses and holds ``config``) before anything is loaded, and names the file and what to do.

The steps are those of :func:`lowrank_train.folders.write_folder` (the writer of every other folder the library
writes), kept here because a checkpoint adds a checksum, ``latest``, pruning and fault points between them; the
fsync helpers are shared.

Test hook: ``LOWRANK_TRAIN_FAULT=<point>:<n>`` makes the ``n``-th save (1-based, in this process) end the process
with ``os._exit(137)`` (as a SIGKILL would) at ``<point>``, one of :data:`FAULT_POINTS`. Only the fault-injection
tests set it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowrank_train.folders import fsync_dir, fsync_tree

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
TEMP_PREFIX = ".tmp-step-"
REPLACED_PREFIX = ".replaced-step-"
REJECTED_PREFIX = "rejected-step-"
FAULT_ENV_VAR = "LOWRANK_TRAIN_FAULT"
# Where LOWRANK_TRAIN_FAULT can end a save, in the order a save passes them.
FAULT_POINTS = ("during-state", "before-rename", "after-aside", "after-rename", "after-latest")
_STEP_FOLDER = re.compile(r"^step-(\d{8})$")
_HASH_CHUNK = 1 << 22
_saves_in_process = 0


class CheckpointError(OSError, ValueError):
    """A checkpoint that cannot be written (disk full, I/O error) or read (missing, corrupt, truncated).

    Also a ``ValueError`` (as ``io.UnsupportedOperation`` is), so the command line reports it as a clear error.
    """


def checkpoint_root(output_dir: str | os.PathLike[str]) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(output_dir) / CHECKPOINTS


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _armed_fault() -> str | None:
    """The test hook of the module docstring: the point at which this save must end the process, if any."""
    global _saves_in_process
    _saves_in_process += 1
    spec = os.environ.get(FAULT_ENV_VAR, "")
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in FAULT_POINTS or not count.isdigit():
        raise ValueError(f"{FAULT_ENV_VAR}={spec!r} must be <point>:<n>, the point one of {FAULT_POINTS}")
    return point if int(count) == _saves_in_process else None


def step_folder_name(step: int) -> str:
    """``step-00000040`` for step 40."""
    return f"step-{step:08d}"


def stage_checkpoint(output_dir: str | os.PathLike[str], step: int) -> Path:
    """A new private staging folder for the checkpoint of ``step`` (other writers, e.g. every rank's DCP shard,
    fill it before :func:`save_checkpoint` commits it with ``staged=``).

    Raises:
        CheckpointError: the folder cannot be created (the message names the checkpoints folder).
    """
    root = checkpoint_root(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{step:08d}-", dir=root))
    except OSError as error:
        raise CheckpointError(f"cannot create a checkpoint folder in {root}: {error}") from error


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    keep: int = 1,
    staged: Path | None = None,
    extra_files: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint, commit it with one atomic rename, point ``latest`` at it, then keep the ``keep`` newest.

    Args:
        output_dir: the run folder.
        step: optimizer steps done; names the folder.
        state: tensors and plain containers (saved with ``torch.save``; must load with ``weights_only=True``).
        meta: JSON-serialisable description (step, config, fingerprint); the checksum of ``state.pt`` is added.
        keep: number of checkpoint folders to keep.
        staged: a folder from :func:`stage_checkpoint` that other writers filled already (sharded checkpoints:
            every rank's files are on disk before this call); ``None`` makes a new one.
        extra_files: ``{path relative to the folder: {"sha256", "bytes"}}`` of the files in ``staged``, recorded
            in ``meta.json`` next to ``state.pt``'s (each writer hashed its own).

    Returns:
        The final folder of this checkpoint.

    Raises:
        CheckpointError: the files could not be written (e.g. the disk is full); the message names the folder and
            the previous checkpoints are untouched.
    """
    armed = _armed_fault()

    def fault(reached: str) -> None:
        if reached == armed:
            os._exit(137)  # as a SIGKILL: no cleanup, no flush

    root = checkpoint_root(output_dir)
    final = root / step_folder_name(step)
    staging = staged if staged is not None else stage_checkpoint(output_dir, step)
    aside: Path | None = None
    try:
        try:
            _write_state(staging / STATE_FILE, state, torn=armed == "during-state")
            fault("during-state")
            written = staging / STATE_FILE
            full_meta = {
                **dict(meta),
                "files": {
                    **dict(extra_files or {}),
                    STATE_FILE: {"sha256": file_sha256(written), "bytes": written.stat().st_size},
                },
            }
            (staging / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True), encoding="utf-8")
            fsync_tree(staging)  # the files and the folder's entries, before the rename can expose them
        except (OSError, RuntimeError) as error:
            # torch.save reports a full disk as a RuntimeError ("enforce fail ... unexpected pos").
            raise CheckpointError(
                f"could not write checkpoint step {step} into {root} ({error}); the previous checkpoints are "
                "intact. Free disk space (or fix the file system) and resume with --resume"
            ) from error
        fault("before-rename")
        if final.exists():  # a re-save of the same step: the old copy goes aside until the new one is committed
            aside = Path(tempfile.mkdtemp(prefix=f"{REPLACED_PREFIX}{step:08d}-", dir=root))
            os.replace(final, aside)
            fault("after-aside")
        os.replace(staging, final)  # the commit point
        fsync_dir(root)
        fault("after-rename")
        _write_latest(root, final.name)
        fault("after-latest")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _prune(root, keep=keep, protect=final.name)
    return final


def _write_state(path: Path, state: Mapping[str, Any], *, torn: bool = False) -> None:
    torch.save(dict(state), path)
    if torn:  # the fault hook: leave half a file behind, as a kill in the middle of the write would
        with open(path, "r+b") as handle:
            handle.truncate(max(1, os.path.getsize(path) // 2))


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
    # Leftovers of interrupted saves are never loaded: remove them. A copy set aside by an interrupted re-save
    # is kept while its step has no committed folder (resolve_checkpoints puts it back).
    for leftover in root.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(f"{REPLACED_PREFIX}*"):
        if (root / step_folder_name(int(leftover.name[len(REPLACED_PREFIX) :][:8]))).is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    folders = sorted(p for p in root.iterdir() if _STEP_FOLDER.match(p.name) and p.is_dir())
    for old in folders[:-keep] if keep > 0 else folders:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def has_checkpoints(output_dir: str | os.PathLike[str]) -> bool:
    """True when the run folder holds any checkpoint folder (committed or set aside by a re-save), or ``latest``."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return False
    return any(
        _STEP_FOLDER.match(p.name) or p.name.startswith(REPLACED_PREFIX) or p.name == LATEST for p in root.iterdir()
    )


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint folder.

    Raises:
        CheckpointError: the file is missing or not valid JSON (the message names it).
    """
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def verify_checkpoint(folder: str | os.PathLike[str], *, require_config: bool = True) -> dict[str, Any]:
    """Checks a checkpoint folder before it is loaded and returns its meta.

    ``meta.json`` must parse (and hold ``config`` unless ``require_config`` is False); ``state.pt`` must exist and
    match the size and sha256 recorded in ``meta.json`` (folders written before checksums were recorded are
    accepted on their size alone).

    Raises:
        CheckpointError: what is wrong, naming the file.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if require_config and not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{folder / META_FILE} has no 'config' entry, so a resume cannot check the run")
    state = folder / STATE_FILE
    if not state.is_file():
        raise CheckpointError(f"{state} is missing")
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    if isinstance(meta.get("sharded"), dict):
        _check_shard_writers(folder, meta["sharded"], files)
    for name, recorded in sorted(files.items(), key=lambda item: item[0] != STATE_FILE):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing ({META_FILE} records it)")
        size = path.stat().st_size
        if size != recorded.get("bytes"):
            raise CheckpointError(f"{path} has {size} bytes, {META_FILE} recorded {recorded.get('bytes')}: truncated")
        if file_sha256(path) != recorded.get("sha256"):
            raise CheckpointError(f"{path} does not match the sha256 recorded in {META_FILE}: the file is corrupt")
    return meta


_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def _check_shard_writers(folder: Path, sharded: Mapping[str, Any], files: Mapping[str, Any]) -> None:
    """A sharded checkpoint must hold a shard of every rank its meta names (issue 22 item 6).

    Raises:
        CheckpointError: fewer ranks' shard files (recorded in ``meta.json``, present on disk, named by DCP's
            ``.metadata``) than ``sharded["world_size"]``; the message names the missing ones.
    """
    expected = int(sharded.get("world_size", 0))
    shards = folder / "shards"
    recorded = {Path(name).name for name in files if name.startswith("shards/")}
    present = {p.name for p in shards.iterdir()} if shards.is_dir() else set()
    writers = {int(m.group(1)) for name in recorded & present if (m := _SHARD_FILE.match(name))}
    missing = sorted(set(range(expected)) - writers)
    if missing or not (shards / ".metadata").is_file():
        lost = ", ".join(f"rank {r}" for r in missing) or "the DCP .metadata"
        raise CheckpointError(
            f"{folder} was written by {len(writers)} of the {expected} ranks its {META_FILE} names (missing: "
            f"{lost}): an incomplete sharded checkpoint, rejected"
        )


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """The checkpoint a resume loads, and what was passed over on the way (for the log).

    Attributes:
        folder: the newest checkpoint folder that verified, ``None`` when there is none.
        meta: its ``meta.json``.
        notes: one line per thing a user should know: ``latest`` was missing or stale, a folder was rejected
            (and moved to ``rejected-step-*``), a copy set aside by an interrupted re-save was put back.
        rejected: ``(folder, reason)`` of every folder that failed :func:`verify_checkpoint`.
    """

    folder: Path | None
    meta: dict[str, Any]
    notes: tuple[str, ...]
    rejected: tuple[tuple[Path, str], ...]


def resolve_checkpoints(output_dir: str | os.PathLike[str], *, set_aside: bool = True) -> ResolvedCheckpoint:
    """Find the checkpoint to resume from: the newest ``step-*`` folder that passes :func:`verify_checkpoint`.

    ``latest`` is only a hint: a crash after a folder's commit but before ``latest`` was switched leaves it stale,
    and then the newer folder wins. A folder that fails verification is renamed to ``rejected-step-*`` (with
    ``set_aside``) so that it is never loaded or counted again but stays for inspection; the next older one is tried.

    Returns:
        The chosen folder (or ``None``), its meta and the notes for the log.
    """
    root = checkpoint_root(output_dir)
    notes: list[str] = []
    rejected: list[tuple[Path, str]] = []
    if not root.is_dir():
        return ResolvedCheckpoint(None, {}, (), ())
    # A re-save interrupted between setting the old copy aside and committing the new one: put the old one back.
    for aside in sorted(root.glob(f"{REPLACED_PREFIX}*")):
        target = root / step_folder_name(int(aside.name[len(REPLACED_PREFIX) :][:8]))
        if not target.exists():
            os.replace(aside, target)
            notes.append(f"{target.name}: put back the copy an interrupted re-save had set aside ({aside.name})")
    folders = sorted((p for p in root.iterdir() if _STEP_FOLDER.match(p.name) and p.is_dir()), reverse=True)
    pointer = root / LATEST
    named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    for folder in folders:
        try:
            meta = verify_checkpoint(folder)
        except CheckpointError as error:
            rejected.append((folder, str(error)))
            moved = ""
            if set_aside:
                destination = root / (REJECTED_PREFIX + folder.name[len("step-") :])
                shutil.rmtree(destination, ignore_errors=True)
                os.replace(folder, destination)
                moved = f"; moved to {destination} for inspection"
            notes.append(f"skipping checkpoint {folder}: {error}{moved}; falling back to an older one")
            continue
        if named is None:
            notes.append(f"{pointer} is missing; resuming from the newest complete checkpoint, {folder.name}")
        elif named != folder.name:
            notes.append(f"{pointer} names {named!r}; resuming from the newest complete checkpoint, {folder.name}")
        return ResolvedCheckpoint(folder, meta, tuple(notes), tuple(rejected))
    return ResolvedCheckpoint(None, {}, tuple(notes), tuple(rejected))


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder of a run, or ``None`` when it has none (read-only: nothing is moved)."""
    return resolve_checkpoints(output_dir, set_aside=False).folder


def load_state(folder: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The saved state of a checkpoint folder, loaded with ``weights_only=True`` (no code runs on load).

    Raises:
        CheckpointError: the file is missing, truncated or not a torch checkpoint (the message names it).
    """
    path = Path(folder) / STATE_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} cannot be read ({error}); it is truncated or corrupt: resume from an older checkpoint "
            "(run.keep_checkpoints > 1 keeps some) or start again with run.overwrite=true"
        ) from error
