"""Seeing a run: the progress bar (terminal) or plain lines, plots of metrics.jsonl, and the real metric sinks."""

import io
import json
import re
import struct
import sys
import time

import pytest
from matplotlib.image import imread

from lowrank_train.cli import main
from lowrank_train.train import load_config, read_metrics, train
from lowrank_train.train.metrics import MetricsWriter
from lowrank_train.train.plot import metric_series, plot_run
from lowrank_train.train.progress import RunProgress, StepStats, format_eta, progress_line


class Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self):
        return True


def stats(step, loss=2.0):
    return StepStats(step=step, loss=loss, lr=1e-3, tokens_per_s=1234.0, peak_memory_bytes=3 * 2**20)


def test_plain_lines_every_interval_with_an_eta():
    lines = []
    progress = RunProgress(total=10, start=4, log=lines.append, interactive=False)
    assert progress.eta_seconds(4) is None
    for step in range(5, 11):
        progress.step(stats(step))
        if step % 2 == 0:
            progress.interval(stats(step))
    progress.close()
    assert [line.split(" | ")[0] for line in lines] == ["step 6/10", "step 8/10", "step 10/10"]
    assert lines[0].startswith("step 6/10 | loss 2.0000 | lr 1.00e-03 | 1,234 tok/s | peak mem 3.0 MiB | ETA ")
    assert lines[-1].endswith("| ETA 0:00:00")
    assert format_eta(3725.4) == "1:02:05" and progress_line(stats(1), 3, None).endswith("peak mem 3.0 MiB")


def test_the_bar_is_drawn_only_for_a_terminal(monkeypatch):
    lines = []
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert not RunProgress(total=3, start=0, log=lines.append).interactive
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    progress = RunProgress(total=3, start=1, log=lines.append)
    assert progress.interactive
    say = progress.wrap(lambda line: sys.stdout.write(line + "\n"))
    progress.step(stats(2, loss=1.5))
    say("eval step 2: loss 1.5")
    progress.interval(stats(2))  # the bar shows it: no plain line
    progress.step(stats(3))
    progress.close()
    say("done")
    out = terminal.getvalue()
    assert lines == []
    assert "3/3" in out and "loss 1.5000" in out and "1,234 tok/s" in out and "mem 3.0 MiB" in out
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", out)  # elapsed<ETA
    assert "eval step 2: loss 1.5\n" in out and out.endswith("done\n")


def test_a_run_in_a_terminal_shows_the_bar(tiny, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    config = load_config(None, [*tiny, "optimizer.name=adamw", "run.memory_table=false"])
    train(config, log=print)
    out = terminal.getvalue()
    assert "4/4" in out and "tok/s" in out and "mem " in out
    assert "step 2/4 | loss" not in out  # plain lines are for non-terminals
    assert "eval step 2: loss" in out and "done: 4 steps" in out


def test_plots_carry_the_metrics(tiny, tmp_path, capsys):
    config = load_config(None, [*tiny, "optimizer.name=adamw", "run.memory_table=false"])
    train(config, log=lambda line: None)
    run = tmp_path / "run"
    # The run drew them itself (matplotlib is installed here).
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == ["loss.png", "lr.png", "throughput.png"]
    records = read_metrics(run)
    series = metric_series(records)
    train_records = [r for r in records if r["split"] == "train"]
    assert series["loss"]["train"] == ([r["step"] for r in train_records], [r["loss"] for r in train_records])
    assert series["loss"]["held-out"][0] == [0, 2, 4]
    assert series["lr"]["lr"][1] == [r["lr"] for r in train_records]
    assert series["throughput"]["tokens/s"][1] == [r["tokens_per_s"] for r in train_records]

    assert main(["plot", str(run), "--out", str(tmp_path / "pictures")]) == 0
    written = sorted((tmp_path / "pictures").glob("*.png"))
    assert [p.name for p in written] == ["loss.png", "lr.png", "throughput.png"]
    assert str(tmp_path / "pictures") in capsys.readouterr().out
    assert all(imread(p).shape == (400, 640, 4) for p in written)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_tensorboard_sink_against_tensorboard(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(None, [*tiny, "optimizer.name=adamw", "run.metrics=[jsonl,tensorboard]"])
    train(config, log=lambda line: None)
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for split in ("train", "eval"):
        records = [r for r in read_metrics(run) if r["split"] == split]
        for key in ("loss", "lr", "tokens_per_s") if split == "train" else ("loss", "perplexity"):
            scalars = events.Scalars(f"{split}/{key}")
            assert [s.step for s in scalars] == [r["step"] for r in records]
            assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)


def wandb_records(path):
    """The records of an offline ``.wandb`` file (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        room = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if room < 7 or (length == 0 and kind == 0):  # block padding
            position += room
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_sink_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    written = [
        {"split": "train", "step": 1, "loss": 2.5, "lr": 1e-3},
        {"split": "train", "step": 2, "loss": 2.0, "lr": 2e-3},
        {"split": "eval", "step": 2, "loss": 2.25, "perplexity": 9.49},
    ]
    writer = MetricsWriter(tmp_path / "run", ("jsonl", "wandb"), run_name="run", config={"run": {"seed": 0}})
    for record in written:
        writer.write(record)
    writer.close()
    (file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")  # inside the run folder
    for _ in range(300):  # wandb's service process may still be flushing the file after finish()
        records = list(wandb_records(file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
            }
            history.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
    assert history == [
        {"_step": 1, "train/loss": 2.5, "train/lr": 1e-3},
        {"_step": 2, "train/loss": 2.0, "train/lr": 2e-3, "eval/loss": 2.25, "eval/perplexity": 9.49},
    ]
