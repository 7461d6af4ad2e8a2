"""The one folder writer (issue 19 item 5, issue 20 item 1): a kill or a failure at any step leaves the old folder
or the new one whole, the next write recovers, and nothing the writer did not create is ever removed.

Kills run in a child process that ends with ``os._exit(137)`` (as a SIGKILL would: no cleanup) at the k-th file
system call of a write, for every k; failures raise ``OSError`` at the k-th call in this process.
"""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lowrank_train import folders
from lowrank_train.folders import FolderExistsError, recover_folder, write_folder

REPO = Path(__file__).resolve().parents[1]
FILES = ("config.json", "weights.bin", "sub/extra.txt")
# The calls a write makes, patched to count (and end or fail) the k-th one.
CALLS = (("os", "rename"), ("os", "fsync"), ("os", "mkdir"), ("shutil", "rmtree"), ("os", "unlink"))


def _fill(folder, version):
    for name in FILES:
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{version}:{name}")


def _version(folder):
    """'old' or 'new' when ``folder`` holds exactly one whole version, else a description of what is there."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    contents = {(folder / name).read_text().split(":")[0] for name in found}
    if found == sorted(FILES) and len(contents) == 1:
        return contents.pop()
    return f"torn: {found} {contents}"


def _hidden(parent):
    prefixes = (folders.STAGING_PREFIX, folders.ASIDE_PREFIX)
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(prefixes))


def _write_new(target, **kwargs):
    with write_folder(target, overwrite=True, **kwargs) as staging:
        _fill(staging, "new")


def _count_calls(tmp_path, existing):
    target = tmp_path / "count" / "model"
    if existing:
        _fill(target, "old")
    counted = [0]
    originals = {(m, n): getattr(sys.modules[m], n) for m, n in CALLS}

    def counting(original):
        def call(*args, **kwargs):
            counted[0] += 1
            return original(*args, **kwargs)

        return call

    try:
        for (module, name), original in originals.items():
            setattr(sys.modules[module], name, counting(original))
        _write_new(target)
    finally:
        for (module, name), original in originals.items():
            setattr(sys.modules[module], name, original)
    return counted[0]


def _kill_at(target, k):
    script = textwrap.dedent(
        f"""
        import os, shutil, sys
        from pathlib import Path
        from lowrank_train.folders import write_folder
        count = [0]
        def patched(original):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == {k}:
                    os._exit(137)
                return original(*args, **kwargs)
            return call
        for module, name in {CALLS!r}:
            setattr(sys.modules[module], name, patched(getattr(sys.modules[module], name)))
        with write_folder({str(target)!r}, overwrite=True) as staging:
            for name in {FILES!r}:
                path = Path(staging) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("new:" + name)
        """
    )
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60).returncode


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "first-write"])
def test_a_kill_at_every_step_leaves_one_whole_folder_and_the_next_write_recovers(tmp_path, existing):
    steps = _count_calls(tmp_path, existing)
    assert steps >= 6
    seen = set()
    for k in range(1, steps + 2):  # the last one is not reached: the write completes
        parent = tmp_path / f"kill-{k}"
        target = parent / "model"
        parent.mkdir()
        if existing:
            _fill(target, "old")
        code = _kill_at(target, k)
        assert code in (0, 137)
        # Right after the kill: the old or the new folder is whole, in place or set aside under its hidden name.
        visible = _version(target)
        asides = [parent / name for name in _hidden(parent) if name.startswith(".lowrank-aside-")]
        assert (
            visible in ("old", "new")
            or (visible == "missing" and not existing)
            or (visible == "missing" and [_version(a) for a in asides] == ["old"])
        ), (k, visible, _hidden(parent))
        recover_folder(target)
        after = _version(target)
        expected = {"old", "new"} if existing else {"missing", "new"}
        assert after in expected, (k, after)
        assert _hidden(parent) == [], (k, _hidden(parent))
        seen.add(after)
        _write_new(target)
        assert _version(target) == "new" and _hidden(parent) == []
    assert seen == ({"old", "new"} if existing else {"missing", "new"})  # kills before and after the commit


def test_a_failure_at_every_step_keeps_the_old_folder_or_commits_the_new(tmp_path, monkeypatch):
    steps = _count_calls(tmp_path, existing=True)
    for k in range(1, steps + 1):
        parent = tmp_path / f"fail-{k}"
        target = parent / "model"
        _fill(target, "old")
        count = [0]

        def failing(original, count=count, k=k):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == k:
                    raise OSError(errno.EIO, "Input/output error", str(args[0]) if args else None)
                return original(*args, **kwargs)

            return call

        with monkeypatch.context() as patch:
            for module, name in CALLS:
                patch.setattr(sys.modules[module], name, failing(getattr(sys.modules[module], name)))
            try:
                _write_new(target)
            except OSError:
                pass
        assert _version(target) in ("old", "new"), k
        assert not [name for name in _hidden(parent) if name.startswith(".lowrank-staging-")], k
        _write_new(target)
        assert _version(target) == "new" and _hidden(parent) == [], k


def test_a_full_disk_leaves_the_previous_folder_and_no_staging(tmp_path):
    target = tmp_path / "model"
    _fill(target, "old")
    with pytest.raises(OSError, match="No space left"), write_folder(target, overwrite=True) as staging:
        (staging / "config.json").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "weights.bin"))
    assert _version(target) == "old" and _hidden(tmp_path) == []


def test_an_existing_folder_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "model"
    _fill(target, "old")
    with pytest.raises(FolderExistsError, match=f"{target} already exists.*--overwrite"):
        with write_folder(target):
            raise AssertionError("the body must not run")
    assert _version(target) == "old" and _hidden(tmp_path) == []
    target.with_name("empty").mkdir()
    with write_folder(tmp_path / "empty") as staging:  # an empty folder counts as absent
        _fill(staging, "new")
    assert _version(tmp_path / "empty") == "new"


def test_nothing_it_did_not_create_is_removed(tmp_path):
    target = tmp_path / "model"
    _fill(target, "old")
    live = os.getppid()  # a live process: its staging folder is still being written
    foreign = [
        tmp_path / f".lowrank-staging-model-{live}-abc",
        tmp_path / f".lowrank-aside-model-{live}-abc",
        tmp_path / ".lowrank-staging-other-1-abc",  # another target's
        tmp_path / ".model-user-folder",
        tmp_path / "notes.txt",
    ]
    for path in foreign[:-1]:
        path.mkdir()
    foreign[-1].write_text("mine")
    _write_new(target)
    assert _version(target) == "new"
    assert all(path.exists() for path in foreign)


def test_a_dead_writers_leftovers_are_recovered(tmp_path):
    target = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    _fill(tmp_path / f".lowrank-aside-model-{pid}-abc", "old")
    (tmp_path / f".lowrank-staging-model-{pid}-abc").mkdir()
    notes = recover_folder(target)
    assert _version(target) == "old" and _hidden(tmp_path) == [] and len(notes) == 2


def test_the_body_sees_an_empty_staging_folder_next_to_the_target(tmp_path):
    with write_folder(tmp_path / "deep" / "model") as staging:
        assert staging.parent == tmp_path / "deep" and staging.name.startswith(folders.STAGING_PREFIX)
        assert list(staging.iterdir()) == [] and (staging.stat().st_mode & 0o777) == 0o755
        _fill(staging, "new")
    assert _version(tmp_path / "deep" / "model") == "new"
    shutil.rmtree(tmp_path / "deep")


def test_a_symlinked_target_is_replaced_without_touching_what_it_points_to(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    _fill(elsewhere, "old")
    (tmp_path / "model").symlink_to(elsewhere, target_is_directory=True)
    _write_new(tmp_path / "model")
    assert not (tmp_path / "model").is_symlink() and _version(tmp_path / "model") == "new"
    assert _version(elsewhere) == "old" and _hidden(tmp_path) == []


def test_write_file_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    from lowrank_train.folders import write_file, write_text

    target = tmp_path / "summary.json"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError), write_file(target) as staging:
        staging.write_text("half", encoding="utf-8")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_text(target, "new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    monkeypatch.undo()
    write_text(target, "new\n")
    assert target.read_text() == "new\n"
