"""``export`` and ``compress`` never destroy what they did not write (issue 20 items 2 and 8).

``export RUN --out RUN`` used to delete the run's checkpoints (the old writer removed the target folder first).
One tiny run is trained per module and copied into each test's folder.
"""

import errno
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lowrank_train.cli import main
from lowrank_train.data.cache import CACHE_ENV_VAR
from lowrank_train.folders import ASIDE_PREFIX, STAGING_PREFIX
from lowrank_train.train import load_config, train
from lowrank_train.train.export import EXPORT_MARKER, ExportError

STEPS = ["step-00000002", "step-00000004"]


@pytest.fixture(scope="module")
def trained_run(train_cache, tiny_overrides, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and its final ``model/``."""
    run = tmp_path_factory.mktemp("export_safety") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV_VAR, str(train_cache))
        overrides = [
            *tiny_overrides,
            f"run.output_dir={run}",
            "run.save_every=2",
            "run.keep_checkpoints=2",
            "run.eval_every=4",
            "run.memory_table=false",
            "optimizer.name=adamw",
        ]
        train(load_config(None, overrides), log=lambda line: None)
    return run


@pytest.fixture
def run(trained_run, tmp_path, train_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(train_cache))
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _checkpoints(run):
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith((STAGING_PREFIX, ASIDE_PREFIX))]


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lowrank-train "), err
    return err


def test_export_into_the_run_folder_is_refused_and_keeps_the_checkpoints(run, capsys):
    # Before the fix this returned 0 and left a model folder where the run was: checkpoints gone.
    assert main(["export", str(run), "--out", str(run)]) == 2
    assert "is the run folder" in _one_line_error(capsys)
    assert _checkpoints(run) == STEPS and (run / "config.yaml").is_file()
    for out in (run, run / "checkpoints", run / "checkpoints" / STEPS[0], run / "notes", run.parent):
        assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2, out
        assert str(out) in _one_line_error(capsys)
    assert _checkpoints(run) == STEPS and (run / "metrics.jsonl").is_file()
    assert not (run / "notes").exists() and _leftovers(run) == [] and _leftovers(run.parent) == []


def test_a_folder_that_is_not_an_export_needs_overwrite(run, tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(other)]) == 2
    err = _one_line_error(capsys)
    assert str(other) in err and "--overwrite" in err
    assert (other / "notes.txt").read_text() == "keep me"

    assert main(["export", str(run), "--out", str(other), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "step-00000004" in out and "newest that verifies" in out
    assert not (other / "notes.txt").exists()
    marker = json.loads((other / EXPORT_MARKER).read_text())
    assert marker["step"] == 4 and marker["checkpoint"] == "step-00000004"
    # An earlier export is replaced without --overwrite; so is the run's own model/ and model-step-N/.
    assert main(["export", str(run), "--out", str(other), "--step", "2"]) == 0
    assert json.loads((other / EXPORT_MARKER).read_text())["step"] == 2
    assert main(["export", str(run)]) == 0 and main(["export", str(run), "--step", "2"]) == 0
    assert (run / "model-step-2" / EXPORT_MARKER).is_file() and _checkpoints(run) == STEPS
    AutoModelForCausalLM.from_pretrained(other)

    a_file = tmp_path / "file.bin"
    a_file.write_text("x")
    capsys.readouterr()  # the progress bars of the exports above
    assert main(["export", str(run), "--out", str(a_file), "--overwrite"]) == 2
    assert "is a file" in _one_line_error(capsys) and a_file.read_text() == "x"
    assert _leftovers(tmp_path) == [] and _leftovers(run) == []


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_passed_over_or_refused_with_the_file_named(run, tmp_path, capsys):
    state = run / "checkpoints" / STEPS[1] / "state.pt"
    _corrupt(state)
    target = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint {state.parent}" in out and "sha256" in out
    assert "step-00000002" in out and "newest that verifies" in out
    assert json.loads((target / EXPORT_MARKER).read_text())["step"] == 2
    assert _checkpoints(run) == STEPS  # an export only reads: the damaged folder stays where it was

    refused = tmp_path / "refused"
    capsys.readouterr()
    assert main(["export", str(run), "--step", "4", "--out", str(refused)]) == 2
    err = _one_line_error(capsys)
    assert str(state) in err and "sha256" in err and "--step" in err
    assert not refused.exists()


def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_export(run, tmp_path, capsys, monkeypatch):
    target = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(target), "--step", "2"]) == 0
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    capsys.readouterr()

    def full_disk(self, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert main(["export", str(run), "--out", str(target)]) == 2
    err = _one_line_error(capsys)
    assert "No space left on device" in err and "free disk space" in err and "model.safetensors" in err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _leftovers(tmp_path) == []

    monkeypatch.setenv("LOWRANK_TRAIN_DEBUG", "1")  # the traceback is kept on request
    with pytest.raises(OSError, match="No space left"):
        main(["export", str(run), "--out", str(target)])
    monkeypatch.delenv("LOWRANK_TRAIN_DEBUG")
    with pytest.raises(ExportError):
        main(["export", str(run), "--out", str(run), "--debug"])


def test_compress_refuses_a_non_empty_model_folder(tmp_path, capsys, monkeypatch):
    import importlib

    compress_module = importlib.import_module("lowrank_train.train.compress_run")

    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "welore.json").write_text("{}")
    argv = [
        "compress",
        "recipes/configs/welore_compress.yaml",
        f"run.output_dir={tmp_path / 'run'}",
        f"model.pretrained={tmp_path / 'dense'}",
        "run.device=cpu",
    ]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert str(model) in err and "--overwrite" in err
    assert (model / "welore.json").read_text() == "{}"

    def built(*args, **kwargs):
        raise FloatingPointError("past the check")

    monkeypatch.setattr(compress_module, "build_model", built)
    assert main([*argv, "--overwrite"]) == 2
    assert "past the check" in _one_line_error(capsys)
    assert main([*argv, "run.overwrite=true"]) == 2
    assert "past the check" in _one_line_error(capsys)


def test_export_verifies_what_it_loads(run):
    from lowrank_train.train.export import export_checkpoint

    lines = []
    folder = export_checkpoint(run, step=2, out=run.parent / "two", log=lines.append)
    assert any("step-00000002" in line and "sha256 verified" in line for line in lines)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
