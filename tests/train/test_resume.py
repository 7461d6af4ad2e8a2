"""A resume continues the same run (issue 12 items 3, 6, 7; issue 15 item 4): same logged losses whatever log_every,
refused on changed data, nothing redone for a finished run, a larger max_steps continues the schedule, damaged files
named; bad inputs are refused before any model is built."""

import json
import math
from pathlib import Path

import pytest
import torch

from lowrank_train.train import (
    ConfigError,
    ResumeError,
    latest_checkpoint,
    load_config,
    load_state,
    read_metrics,
    train,
)
from lowrank_train.train import checkpoint as ckpt
from lowrank_train.train import loop as loop_module
from lowrank_train.train.metrics import METRICS_FILE
from lowrank_train.train.schedule import lr_factor

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes/configs/demo.yaml"
QUIET = {"log": lambda line: None}


def _config(overrides, *extra):
    return load_config(DEMO, [*overrides, "optimizer.name=adamw", "run.eval_every=0", *extra])


def _records(output, split="train"):
    return {r["step"]: r for r in read_metrics(output) if r["split"] == split}


def test_resume_with_another_log_every_logs_the_uninterrupted_losses(tiny, tmp_path):
    """Issue 12 item 6: the old loop restarted its loss window at the resume step (10.6103 vs 10.6487)."""
    common = ["run.max_steps=8", "run.log_every=4"]
    train(_config(tiny, *common, f"run.output_dir={tmp_path / 'a'}"), **QUIET)
    broken = _config(tiny, *common, "run.save_every=3", f"run.output_dir={tmp_path / 'b'}")
    train(broken, stop_after=3, **QUIET)
    train(_config(tiny, *common, "run.save_every=5", f"run.output_dir={tmp_path / 'b'}"), resume=True, **QUIET)
    straight, resumed = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert sorted(resumed) == sorted(straight) == [4, 8]
    for step in (4, 8):
        assert resumed[step]["loss"] == straight[step]["loss"], step
    # resumed with log_every=2: the windows are cut at multiples of 2 of the same per-step losses
    train(_config(tiny, *common, "run.log_every=2", f"run.output_dir={tmp_path / 'c'}"), **QUIET)
    train(_config(tiny, *common, "run.save_every=3", f"run.output_dir={tmp_path / 'd'}"), stop_after=3, **QUIET)
    train(_config(tiny, *common, "run.log_every=2", f"run.output_dir={tmp_path / 'd'}"), resume=True, **QUIET)
    every2, resumed2 = _records(tmp_path / "c"), _records(tmp_path / "d")
    for step in (4, 6, 8):
        assert resumed2[step]["loss"] == every2[step]["loss"], step


def test_a_changed_corpus_is_refused_unless_allowed(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning was the word, and the word was with the text. " * 400, encoding="utf-8")
    config = _config(tiny, f"data.corpus={corpus}", "run.max_steps=4", "run.save_every=2")
    train(config, stop_after=2, **QUIET)
    corpus.write_text("Another text entirely, which the first run never saw on its way. " * 400, encoding="utf-8")
    with pytest.raises(ResumeError, match=r"the data changed since the checkpoint.*run.allow_data_change=true"):
        train(config, resume=True, **QUIET)
    lines = []
    summary = train(
        _config(tiny, f"data.corpus={corpus}", "run.max_steps=4", "run.allow_data_change=true"),
        resume=True,
        log=lines.append,
    )
    assert summary["steps"] == 4 and any("continuing on the new data" in line for line in lines)


def test_resuming_a_finished_run_changes_nothing(tiny):
    config = _config(tiny, "run.max_steps=2")
    first = train(config, **QUIET)
    output = Path(config.run.output_dir)
    before = (output / METRICS_FILE).read_text()
    checkpoint_bytes = (latest_checkpoint(output) / ckpt.STATE_FILE).read_bytes()
    lines = []
    again = train(config, resume=True, log=lines.append)
    assert again == json.loads(json.dumps(first))
    assert (output / METRICS_FILE).read_text() == before  # no duplicate eval record
    assert (latest_checkpoint(output) / ckpt.STATE_FILE).read_bytes() == checkpoint_bytes
    assert any("already complete at step 2" in line for line in lines)


def test_a_larger_max_steps_continues_the_cosine_from_the_current_rate(tiny, tmp_path):
    """Issue 15 item 4: --resume run.max_steps=<more> continues; the rate goes on from where it was, no jump."""
    common = ["schedule.warmup_steps=1", "schedule.min_lr_ratio=0.1"]
    config = _config(tiny, *common, "run.max_steps=6", "run.save_every=3")
    train(config, stop_after=3, **QUIET)
    lines = []
    train(_config(tiny, *common, "run.max_steps=10"), resume=True, log=lines.append)
    lr = config.optimizer.lr
    logged = {step: r["lr"] for step, r in _records(config.run.output_dir).items()}
    old = [lr_factor(s, max_steps=6, warmup_steps=1, min_lr_ratio=0.1) for s in range(6)]
    assert [logged[s + 1] for s in range(3)] == pytest.approx([lr * f for f in old[:3]])
    # steps 3..9: a cosine from the rate step 3 had under the old plan down to min_lr_ratio at step 9
    expected = [0.1 + (old[3] - 0.1) * 0.5 * (1 + math.cos(math.pi * (s - 3) / 6)) for s in range(3, 10)]
    assert [logged[s + 1] for s in range(3, 10)] == pytest.approx([lr * f for f in expected])
    assert logged[10] == pytest.approx(lr * 0.1)
    assert any("run.max_steps 6 -> 10" in line and "cosine" in line for line in lines)
    # and a finished run continued further: it goes on at its final rate (min_lr_ratio)
    train(_config(tiny, *common, "run.max_steps=12"), resume=True, **QUIET)
    logged = {step: r["lr"] for step, r in _records(config.run.output_dir).items()}
    assert logged[11] == pytest.approx(lr * 0.1) and logged[12] == pytest.approx(lr * 0.1)


def test_a_smaller_max_steps_than_the_checkpoint_is_refused(tiny):
    train(_config(tiny, "run.max_steps=4", "run.save_every=3"), stop_after=3, **QUIET)
    with pytest.raises(ResumeError, match=r"at step 3, past run.max_steps=2"):
        train(_config(tiny, "run.max_steps=2"), resume=True, **QUIET)


def test_a_torn_metrics_line_is_dropped_with_a_warning(tiny):
    config = _config(tiny, "run.max_steps=4", "run.save_every=2")
    train(config, stop_after=3, **QUIET)
    metrics = Path(config.run.output_dir) / METRICS_FILE
    metrics.write_text(metrics.read_text() + '{"split": "train", "step": 3, "lo', encoding="utf-8")
    lines = []
    train(config, resume=True, log=lines.append)
    assert any("torn last line" in line and METRICS_FILE in line for line in lines)
    assert sorted(_records(config.run.output_dir)) == [1, 2, 3, 4]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_kept_one(tiny, tmp_path):
    """Issue 12 item 3: overwritten tensor bytes used to resume silently (eval loss 10.6 -> 25.0)."""
    common = ["run.max_steps=6", "run.save_every=2", "run.keep_checkpoints=2"]
    train(_config(tiny, *common, f"run.output_dir={tmp_path / 'straight'}"), **QUIET)
    config = _config(tiny, *common, f"run.output_dir={tmp_path / 'run'}")
    train(config, stop_after=5, **QUIET)
    newest = latest_checkpoint(config.run.output_dir)
    assert newest.name == "step-00000004"
    state = newest / ckpt.STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    state.write_bytes(bytes(data))
    lines = []
    train(config, resume=True, log=lines.append)
    assert any("does not match the sha256" in line and "falling back" in line for line in lines), lines
    assert any("resumed from" in line and "step-00000002" in line for line in lines)
    final = load_state(latest_checkpoint(config.run.output_dir))["model"]
    for name, tensor in load_state(latest_checkpoint(tmp_path / "straight"))["model"].items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0, msg=name)


def test_a_lone_corrupt_checkpoint_names_the_file_and_what_to_do(tiny):
    config = _config(tiny, "run.max_steps=4", "run.save_every=2")
    train(config, stop_after=3, **QUIET)
    (latest_checkpoint(config.run.output_dir) / ckpt.META_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(ckpt.CheckpointError, match=r"meta.json is not valid JSON.*run.overwrite=true"):
        train(config, resume=True, **QUIET)


def test_a_streamed_source_starts_training_without_reading_it_all(tiny, tmp_path, monkeypatch):
    """The loop reads the data through open_training_data: a streamed source is pulled batch by batch."""
    corpus = tmp_path / "many.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"document {i} " + "word " * 60}) + "\n" for i in range(400)), encoding="utf-8"
    )
    from lowrank_train.data import corpora

    pulled = []
    real = corpora.iter_documents

    def counting(*args, **kwargs):
        for document in real(*args, **kwargs):
            pulled.append(1)
            yield document

    monkeypatch.setattr("lowrank_train.data.training_data.iter_documents", counting)
    config = _config(
        tiny,
        f"data.corpus={corpus}",
        "data.streaming=true",
        "data.shuffle_buffer=0",
        "data.heldout_documents=2",
        "data.max_documents=400",
        "run.max_steps=2",
        "run.save_every=1",
    )
    train(config, **QUIET)
    assert 0 < len(pulled) < 100, len(pulled)  # 2 steps x 2 x 32 tokens need a handful of 60-word documents
    state = load_state(latest_checkpoint(config.run.output_dir))
    assert state["data"]["source"] == "stream" and int(state["data"]["step"]) == 2
    assert ckpt.read_meta(latest_checkpoint(config.run.output_dir))["data_fingerprint"]


# (overrides, words the error must contain): issue 12 item 7, refused by load_config
NON_FINITE = [
    "optimizer.lr=.inf",
    "optimizer.lr=.nan",
    "optimizer.max_grad_norm=.nan",
    "optimizer.weight_decay=.nan",
    "optimizer.eps=.inf",
    "optimizer.scale=-.inf",
    "optimizer.betas=[.nan, 0.99]",
    "model.init_std=.nan",
    "schedule.min_lr_ratio=.nan",
    "data.heldout_fraction=.nan",
    "compress.target=.nan",
    "compress.damping=.inf",
]


@pytest.mark.parametrize("override", NON_FINITE)
def test_non_finite_numbers_are_refused_at_config_load(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}(\[0\])? must be a finite number"):
        load_config(DEMO, [override])


def test_an_empty_yaml_is_refused_at_once(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty.*demo.yaml"):
        load_config(empty)


def _no_model(*args, **kwargs):
    raise AssertionError("the model was built before the output folder was checked")


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_an_unusable_output_dir_is_refused_before_the_model(tiny, tmp_path, monkeypatch, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    output = blocker if where == "is-a-file" else blocker / "run"
    monkeypatch.setattr(loop_module, "build_model", _no_model)
    with pytest.raises(
        ConfigError, match=rf"run.output_dir=.*{'is a file' if where == 'is-a-file' else 'lies under'}"
    ):
        train(_config(tiny, f"run.output_dir={output}"), **QUIET)


def test_a_read_only_output_dir_is_refused_before_the_model(tiny, tmp_path, monkeypatch):
    output = tmp_path / "readonly"
    output.mkdir()
    monkeypatch.setattr(loop_module, "build_model", _no_model)
    # root ignores permission bits, so the refusal of the file system is simulated where the probe file is made
    from lowrank_train.train import run_dir

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_dir.tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match=r"run.output_dir=.*readonly.*cannot be written \(Permission denied\)"):
        train(_config(tiny, f"run.output_dir={output}"), **QUIET)


def test_an_unknown_corpus_offline_names_data_corpus_and_the_offline_choices(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"data.corpus='kjvv'.*kjv, shakespeare"):
        train(_config(tiny, "data.corpus=kjvv"), **QUIET)


def test_compress_model_with_a_dict_says_to_pass_a_welore_config():
    from lowrank_train.welore import compress_model

    with pytest.raises(TypeError, match=r"pass WeLoreConfig\(\*\*\{'target': 0.2\}\)"):
        compress_model(torch.nn.Linear(2, 2), {"target": 0.2})


def test_optimizer_nonfinite_reaches_the_optimizer(tiny):
    from lowrank_train.train.setup import build_optimizer, pretrain_param_groups

    def built(*overrides):
        config = load_config(DEMO, [*tiny, "optimizer.name=galore", *overrides])
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16))
        return model, build_optimizer(pretrain_param_groups(model, config.optimizer), config)

    def step(model, optimizer, grad_value):
        for p in model.parameters():
            p.grad = torch.full_like(p, grad_value)
        optimizer.step()

    # Reference: the default policy ("raise") refuses the NaN step and then takes only the finite ones.
    (model, optimizer), (ref_model, ref_optimizer) = built("optimizer.nonfinite=skip"), built()
    with pytest.raises(ValueError, match="non-finite"):
        step(ref_model, ref_optimizer, float("nan"))
    step(model, optimizer, float("nan"))  # skipped and counted, nothing applied
    assert optimizer.skipped_steps == 1
    for grad_value in (0.5, -0.25):
        step(model, optimizer, grad_value)
        step(ref_model, ref_optimizer, grad_value)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="optimizer.nonfinite"):
        load_config(DEMO, ["optimizer.name=adamw", "optimizer.nonfinite=skip"])
