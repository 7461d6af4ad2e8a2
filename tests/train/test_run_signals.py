"""SIGTERM / SIGINT save and stop, one writer per run folder, resumable config changes (issue 20 items 3, 4;
issue 19 item 7). The signal tests run ``lowrank-train pretrain`` in a child process, signal it after a few
logged steps and resume it here: the final numbers must equal those of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lowrank_train.train import load_config, read_metrics, train
from lowrank_train.train.run_dir import LOCK_FILE, RESUME_CHANGES_FILE, RunLockedError, run_folder_lock
from lowrank_train.train.signals import exit_status

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes/configs/demo.yaml"
QUIET = {"log": lambda line: None}
# The child slows each step (and each checkpoint save) with a sleep around the unchanged call, so that a signal
# lands mid-run.
CHILD = """
import sys, time
from lowrank_train import cli
from lowrank_train.train import loop
def slowed(real, seconds):
    def call(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    return call
loop.optimizer_step = slowed(loop.optimizer_step, {delay})
loop.save_run_checkpoint = slowed(loop.save_run_checkpoint, {save_delay})
sys.exit(cli.main(sys.argv[1:]))
"""


def _overrides(tiny, folder, *extra):
    return [*tiny, "run.eval_every=0", "run.max_steps=12", f"run.output_dir={folder}", *extra]


def _start(overrides, delay=0.05, save_delay=0.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-c",
        textwrap.dedent(CHILD.format(delay=delay, save_delay=save_delay)),
        "pretrain",
        str(DEMO),
        *overrides,
    ]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(child, text, timeout=120):
    """Reads the child's stdout until a line holding ``text``; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    child.kill()
    raise AssertionError(f"no {text!r} in the child's output: {''.join(lines)}{child.stderr.read()}")


def _train_records(output):
    return {r["step"]: r["loss"] for r in read_metrics(output) if r["split"] == "train"}


@pytest.mark.parametrize(
    ("signum", "options"),
    [
        pytest.param(signal.SIGTERM, ["optimizer.name=adamw"], id="sigterm-adamw"),
        pytest.param(signal.SIGINT, ["optimizer.name=galore", "optimizer.layerwise=true"], id="sigint-layerwise"),
    ],
)
def test_a_signal_saves_and_stops_and_the_resume_equals_the_uninterrupted_run(tiny, tmp_path, signum, options):
    straight = train(load_config(DEMO, _overrides(tiny, tmp_path / "a", *options)), **QUIET)
    folder = tmp_path / "b"
    child = _start(_overrides(tiny, folder, *options))
    _wait_for(child, "step 3/12")
    child.send_signal(signum)
    out, err = child.communicate(timeout=120)
    assert child.returncode == exit_status(signum) == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name} after step" in out
    assert f"Resume with: lowrank-train pretrain {folder / 'config.yaml'} --resume" in out
    stopped = int(out.split("after step ")[1].split(":")[0])
    assert 3 <= stopped < 12
    assert not (folder / "summary.json").exists()
    resumed = train(load_config(DEMO, _overrides(tiny, folder, *options)), resume=True, **QUIET)
    assert resumed["final_eval_loss"] == straight["final_eval_loss"]
    assert _train_records(folder) == _train_records(tmp_path / "a")


def test_a_second_signal_exits_at_once(tiny, tmp_path):
    # the first signal ends in a save that takes 3 s: the second lands inside it, wherever the first one landed
    child = _start(_overrides(tiny, tmp_path / "run", "optimizer.name=adamw"), save_delay=3.0)
    _wait_for(child, "step 1/12")
    child.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 143
    assert "SIGTERM again: exiting now without a checkpoint" in err
    assert "stopped by SIGTERM" not in out  # it did not wait for the checkpoint


def test_a_second_process_on_the_same_run_folder_is_refused(tiny, tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from lowrank_train.train.run_dir import run_folder_lock\n"
            f"with run_folder_lock(Path({str(folder)!r})):\n    print('locked', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = load_config(DEMO, _overrides(tiny, folder, "run.max_steps=1"))
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {holder.pid}, lock .*{LOCK_FILE}\)"):
            train(config, **QUIET)
        assert not (folder / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.communicate("", timeout=60)
    assert train(config, **QUIET)["steps"] == 1  # released when its holder ended


def test_a_lock_left_by_a_killed_process_is_not_stale(tmp_path):
    folder = tmp_path / "run"
    script = (
        "import os; from pathlib import Path; from lowrank_train.train.run_dir import run_folder_lock\n"
        f"with run_folder_lock(Path({str(folder)!r})):\n    os._exit(137)"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60).returncode == 137
    assert (folder / LOCK_FILE).read_text().strip().isdigit()
    with run_folder_lock(folder):
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
    with run_folder_lock(folder):  # and released again on exit
        pass


@pytest.mark.parametrize("method", [["optimizer.name=adamw"], ["optimizer.name=galore", "optimizer.layerwise=true"]])
def test_resume_accepts_and_records_changes_that_keep_the_state_layout(tiny, tmp_path, method):
    common = [*method, "run.max_steps=4"]
    changed = ["optimizer.lr=2e-3", "optimizer.max_grad_norm=1.0", "schedule.min_lr_ratio=0.2", "run.log_every=2"]
    train(load_config(DEMO, _overrides(tiny, tmp_path / "a", *common, *changed)), **QUIET)
    folder = tmp_path / "b"
    train(load_config(DEMO, _overrides(tiny, folder, *common, "run.save_every=2")), stop_after=2, **QUIET)
    lines = []
    train(load_config(DEMO, _overrides(tiny, folder, *common, *changed)), resume=True, log=lines.append)
    (entry,) = [json.loads(line) for line in (folder / RESUME_CHANGES_FILE).read_text().splitlines()]
    assert entry["step"] == 2
    assert entry["changes"]["optimizer.lr"] == [0.004, 0.002]
    assert entry["changes"]["optimizer.max_grad_norm"] == [0.0, 1.0]
    assert entry["changes"]["schedule.min_lr_ratio"][1] == 0.2
    assert any("changed since the checkpoint" in line and "optimizer.lr 0.004 -> 0.002" in line for line in lines)
    lrs = {r["step"]: r["lr"] for r in read_metrics(folder) if r["split"] == "train"}
    expected = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "a") if r["split"] == "train"}
    assert lrs[4] == pytest.approx(expected[4])  # the new peak lr and schedule are in force after the resume


def test_resuming_a_finished_run_with_a_new_lr_records_nothing(tiny, tmp_path):
    folder = tmp_path / "run"
    train(load_config(DEMO, _overrides(tiny, folder, "optimizer.name=adamw", "run.max_steps=2")), **QUIET)
    again = load_config(DEMO, _overrides(tiny, folder, "optimizer.name=adamw", "run.max_steps=2", "optimizer.lr=1e-3"))
    train(again, resume=True, **QUIET)
    assert not (folder / RESUME_CHANGES_FILE).exists()
