"""Errors a user can cause end in one line naming the path and what to do, exit status 2 (issue 20 item 8);
``--debug`` or ``LOWRANK_TRAIN_DEBUG=1`` keeps the traceback."""

import errno

import pytest

from lowrank_train import cli
from lowrank_train.cli import describe_error, main


def _safetensor_error(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # SafetensorError is not importable by a stable public name everywhere
        assert type(error).__name__ == "SafetensorError"
        return error
    raise AssertionError("the damaged file was read")


CASES = [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/model.safetensors"), "free disk space"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "read-only"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/file/model"), "is a file, not a folder"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "permission denied"),
]


@pytest.mark.parametrize(("error", "advice"), CASES, ids=lambda case: getattr(case, "strerror", None) or "")
def test_os_errors_are_one_line_with_the_path_and_advice(error, advice, monkeypatch, capsys):
    line = describe_error(error)
    assert line.startswith(f"{error.filename}: {error.strerror}") and advice in line and "\n" not in line

    def failing(args):
        raise error

    monkeypatch.setattr(cli, "_run", failing)
    assert main(["plot", "runs/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lowrank-train plot: error: {line}"


def test_a_safetensors_error_is_one_line(tmp_path, monkeypatch, capsys):
    error = _safetensor_error(tmp_path)

    def failing(args):
        raise error

    monkeypatch.setattr(cli, "_run", failing)
    assert main(["plot", "runs/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "safetensors file" in err and "damaged" in err


def test_library_messages_are_kept(monkeypatch, capsys):
    from lowrank_train.folders import FolderExistsError

    def failing(args):
        raise FolderExistsError("/runs/a/model already exists and is not empty: pass --overwrite to replace it")

    monkeypatch.setattr(cli, "_run", failing)
    assert main(["export", "runs/a"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("/runs/a/model already exists and is not empty: pass --overwrite to replace it")
    )


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_keeps_the_traceback(how, monkeypatch):
    def failing(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/a")

    monkeypatch.setattr(cli, "_run", failing)
    argv = {"flag-before": ["--debug", "plot", "runs/a"], "flag-after": ["plot", "runs/a", "--debug"]}.get(how)
    if how == "env":
        monkeypatch.setenv(cli.DEBUG_ENV_VAR, "1")
        argv = ["plot", "runs/a"]
    with pytest.raises(OSError, match="No space left"):
        main(argv)


def test_a_missing_run_folder_in_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "file" / "run") in err
