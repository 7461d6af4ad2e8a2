"""One safe folder writer for every folder the library writes: models, exports, compressed models, caches.

``with write_folder(target) as staging: ...`` writes into a hidden sibling, then commits it::

    1. recover      leftovers of an earlier, interrupted write of ``target`` are resolved (see below)
    2. stage        the body writes into ``.lowrank-staging-<name>-<pid>-*`` next to ``target``
    3. fsync        every file and folder of the staging folder, so the rename never exposes unwritten data
    4. set aside    an existing ``target`` is renamed to ``.lowrank-aside-<name>-<pid>-*``
    5. commit       the staging folder is renamed to ``target`` (the parent folder is fsynced)
    6. remove       the set-aside copy is deleted

A kill at any moment leaves either the old folder or the new one whole, possibly under its hidden name. The next
write (or :func:`recover_folder`) puts a set-aside copy back when ``target`` is missing, deletes it when ``target``
is there, and deletes staging folders of dead processes. Only names with those two prefixes are ever removed, and
only ones whose process is gone (or is this one, outside any write): nothing the writer did not create, and no
folder another live process is still writing. An existing ``target`` is only replaced with ``overwrite=True``
(an empty folder counts as absent).

``train/checkpoint.py`` keeps its own commit (same steps, with ``.tmp-step-*`` / ``.replaced-step-*`` names, a
checksum and ``latest``) and shares the fsync helpers of this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)
STAGING_PREFIX = ".lowrank-staging-"
ASIDE_PREFIX = ".lowrank-aside-"
_ACTIVE: set[Path] = set()  # staging and aside folders of writes in progress in this process


class FolderExistsError(FileExistsError):
    """The target folder exists, is not empty, and ``overwrite`` was not given."""


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to the disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (new names, renames) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first) under ``root``, ``root`` included."""
    folders = []
    for current, _, files in os.walk(root):
        for name in files:
            path = os.path.join(current, name)
            if not os.path.islink(path):
                fsync_file(path)
        folders.append(current)
    for folder in reversed(folders):
        fsync_dir(folder)


def is_empty_folder(path: Path) -> bool:
    """True for a folder without entries."""
    return path.is_dir() and not any(path.iterdir())


def _pattern(prefix: str, name: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix + name)}-(\d+)-[^/]+$")


def _owner_gone(path: Path, pid: int) -> bool:
    """True when the process that made ``path`` no longer writes it: dead, or this one outside any write."""
    if pid == os.getpid():
        return path not in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _leftovers(target: Path, prefix: str) -> list[Path]:
    if not target.parent.is_dir():
        return []
    pattern = _pattern(prefix, target.name)
    found = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and _owner_gone(entry, int(match.group(1))):
            found.append(entry)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover_folder(target: str | os.PathLike[str]) -> list[str]:
    """Resolve what an interrupted write of ``target`` left behind.

    A set-aside copy is put back when ``target`` is missing (the newest one, if several) and deleted when ``target``
    is there; staging folders of finished processes are deleted.

    Returns:
        One line per action taken, for a log.
    """
    target = Path(target)
    notes = []
    asides = _leftovers(target, ASIDE_PREFIX)
    if asides and not target.exists():
        os.rename(asides[-1], target)
        notes.append(f"{target}: put back the previous copy an interrupted write had set aside ({asides[-1].name})")
        asides = asides[:-1]
    for leftover in [*asides, *_leftovers(target, STAGING_PREFIX)]:
        _remove(leftover)
        notes.append(f"{target}: removed {leftover.name}, left by an interrupted write")
    return notes


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def write_folder(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder whole or not at all: the body fills the yielded staging folder, which then replaces ``target``.

    Args:
        target: the folder to write; its parent is created if needed.
        overwrite: replace an existing, non-empty ``target``. Without it such a target is refused before the body
            runs (an empty folder is replaced either way).

    Yields:
        The staging folder (empty, mode 0o755) to write into.

    Raises:
        FolderExistsError: ``target`` exists, is not empty and ``overwrite`` is False (the message names it).
        OSError: a write or rename failed (e.g. a full disk); the staging folder is removed and the previous
            ``target`` is as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for note in recover_folder(target):
        logger.info(note)
    if target.exists() and not overwrite and not is_empty_folder(target):
        raise FolderExistsError(f"{target} already exists and is not empty: pass --overwrite to replace it")
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-{os.getpid()}-", dir=target.parent))
    _ACTIVE.add(staging)
    aside: Path | None = None
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        yield staging
        fsync_tree(staging)
        if target.exists() or target.is_symlink():
            aside = target.parent / f"{ASIDE_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
            _ACTIVE.add(aside)
            os.rename(target, aside)
        os.rename(staging, target)  # the commit point
        fsync_dir(target.parent)
    except BaseException:
        if aside is not None and aside.exists() and not target.exists():
            os.rename(aside, target)  # the new folder never went in: the old one comes back
            aside = None
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(staging)
        if aside is not None:
            _ACTIVE.discard(aside)
    if aside is not None:
        # Committed: the old copy goes. A failure here leaves it for the next write's recover_folder.
        _remove(aside)


@contextlib.contextmanager
def write_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Write one file whole or not at all (a summary, a plot, a ``--plan-out`` config): the file counterpart of
    :func:`write_folder`.

    The body writes the yielded path, a hidden sibling ``.lowrank-staging-<name>-<pid>-*``; it is fsynced and
    renamed over ``target`` in one step, so a reader sees the old file or the new one, never half of either.

    Yields:
        The staging path (not yet created) to write.

    Raises:
        OSError: a write or the rename failed; the staging file is removed and ``target`` is as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"{STAGING_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"
    try:
        yield staging
        fsync_file(staging)
        os.replace(staging, target)  # the commit point
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        raise


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    """``target`` holds ``text`` (UTF-8), written through :func:`write_file`."""
    with write_file(target) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(target)
