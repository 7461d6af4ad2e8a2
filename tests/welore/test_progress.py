"""compress_model's progress (issue 24 item 2): plain lines per phase off a terminal, silence by default, timings."""

import io
import time

import pytest
import torch

from lowrank_train.progress_bar import PhaseProgress
from lowrank_train.welore import STRATEGIES, WeLoreConfig, compress_model, guard_candidates
from lowrank_train.welore.compress import PHASES


def _done(lines: list[str]) -> list[str]:
    # The phases in the order they ended.
    return [line.split(" done in ")[0] for line in lines if " done in " in line]


def _phases_of(strategy: str) -> list[str]:
    entry = STRATEGIES[strategy]
    optional = ["generation"] * (entry.generated_fraction > 0) + ["sensitivity"] * entry.sensitivity
    return ["calibration", *optional, "spectra", "allocation", "factors"]


def test_progress_names_each_phase_in_order_on_a_plain_stream(llama, calibration, capsys):
    start = time.perf_counter()
    report = compress_model(llama, WeLoreConfig(0.3), calibration, progress=True)
    total = time.perf_counter() - start
    lines = capsys.readouterr().out.splitlines()

    candidates = guard_candidates()
    winner = report.guard.winner
    guarded = ["calibration"] + [p for name in candidates for p in [*_phases_of(name), "guard"]]
    assert _done(lines) == guarded + _phases_of(winner)  # then the winner refitted on every sequence
    assert [line for line in lines if line.startswith("guard: candidate ")] == [
        f"guard: candidate {n}/{len(candidates)} {name}" for n, name in enumerate(candidates, 1)
    ]
    assert f"guard: refitting {winner} on all 24 calibration sequences" in lines
    for phase in ("spectra", "factors"):
        assert f"{phase}: 2 blocks" in lines
    assert any(line.startswith("spectra 1/2 blocks | ETA ") for line in lines)
    assert any(line.startswith("generation: 31 steps (") for line in lines)
    assert any(line.startswith(f"guard: {candidates[-1]} held-out loss ") for line in lines)
    assert not any("q_proj" in line or "layers.0" in line for line in lines)  # nothing per matrix

    assert set(report.phase_seconds) == set(PHASES)
    assert all(seconds > 0.0 for seconds in report.phase_seconds.values())
    assert sum(report.phase_seconds.values()) <= total
    assert report.to_dict()["phase_seconds"] == report.phase_seconds


def test_no_progress_prints_nothing_and_still_times_the_phases(llama, calibration, capsys):
    report = compress_model(llama, WeLoreConfig(0.3, "whitened"), calibration)
    assert capsys.readouterr() == ("", "")
    assert set(report.phase_seconds) == set(PHASES)
    assert report.phase_seconds["guard"] == report.phase_seconds["sensitivity"] == 0.0
    assert report.phase_seconds["spectra"] > 0.0 and report.phase_seconds["factors"] > 0.0


def test_phase_progress_lines_every_tenth_with_eta_and_a_terminal_bar():
    lines: list[str] = []
    progress = PhaseProgress(log=lines.append, interactive=False)
    with progress.phase("factors", 20, "blocks") as advance:
        for _ in range(20):
            advance()
    assert lines[0] == "factors: 20 blocks" and lines[-1].startswith("factors done in ")
    ticks = [line.split(" |")[0] for line in lines[1:-1]]
    assert ticks == [f"factors {n}/20 blocks" for n in range(2, 20, 2)]
    assert all(" | ETA " in line for line in lines[1:-1])

    stream = io.StringIO()
    bar = PhaseProgress(file=stream, interactive=True)
    with bar.phase("spectra", 3, "blocks") as advance:
        for _ in range(3):
            advance()
    assert "spectra" in stream.getvalue() and "3/3" in stream.getvalue()
    assert PhaseProgress(file=io.StringIO()).interactive is False  # not a terminal: plain lines
    with pytest.raises(RuntimeError), PhaseProgress(enabled=False).phase("x"):
        raise RuntimeError("a failing phase still ends its timing")


@pytest.mark.parametrize("max_batches", [0, 7])
def test_evaluation_progress_steps_once_per_batch(llama, calibration, max_batches, capsys):
    # compress's held-out evaluations (issue 24): plain lines with an ETA per tenth of the batches off a terminal,
    # a bar in one, the same loss as the silent evaluation, and both evaluations' seconds under "evaluation".
    from lowrank_train.train.compress_run import evaluate_with_progress
    from lowrank_train.train.evaluation import evaluate, num_batches

    cpu = torch.device("cpu")
    batches = num_batches(calibration, 2, max_batches)
    assert batches == (max_batches or 12)
    calls = []
    silent = evaluate(llama, calibration, 2, max_batches, cpu, on_batch=lambda: calls.append(1))
    assert len(calls) == batches and silent == evaluate(llama, calibration, 2, max_batches, cpu)

    lines: list[str] = []
    plain = PhaseProgress(log=lines.append, interactive=False)
    assert evaluate_with_progress(plain, llama, calibration, 2, max_batches, cpu, "before compression") == silent
    assert lines[0] == f"evaluation: {batches} batches (before compression)"
    assert lines[-1].startswith("evaluation done in ")
    ticks = [line.split(" |")[0] for line in lines[1:-1]]
    tenths = [n for n in range(1, batches) if 10 * n // batches > 10 * (n - 1) // batches]  # each, under 10
    assert ticks == [f"evaluation {n}/{batches} batches" for n in tenths] and len(tenths) >= min(batches - 1, 9)
    assert all(" | ETA " in line for line in lines[1:-1])
    first = plain.seconds["evaluation"]
    evaluate_with_progress(plain, llama, calibration, 2, max_batches, cpu, "after compression")
    assert plain.seconds["evaluation"] > first and f"evaluation: {batches} batches (after compression)" in lines

    stream = io.StringIO()
    evaluate_with_progress(PhaseProgress(file=stream, interactive=True), llama, calibration, 2, max_batches, cpu, "x")
    assert "evaluation (x)" in stream.getvalue() and f"{batches}/{batches}" in stream.getvalue()
    assert capsys.readouterr() == ("", "")  # nothing printed besides the given log and stream


def test_closing_report_of_a_forced_data_free_strategy(llama):
    # No calibration: the energy column says so, there is no guard line, and phases that did not run are left out.
    from lowrank_train.train.compress_run import closing_report

    report = compress_model(llama, WeLoreConfig(0.3, "welore"))
    by_type = report.by_type()
    assert all(entry["calibration_energy"] is None for entry in by_type.values())
    assert sum(entry["params_after"] for entry in by_type.values()) == report.params_after
    summary = {"eval_loss_after": 2.0, "parameters_after": 75, "parameters_before": 100, "perplexity_before": 5.0}
    timing = {"phase_seconds": {**report.phase_seconds, "evaluation": 0.5}, "seconds": 3.0, "peak_memory_bytes": 2**30}
    lines = closing_report(report, summary, timing, torch.device("cpu"))
    after = "after: eval loss 2.0000, perplexity 7.39 (before 5.00), 75 parameters (25.0% of the model removed)"
    assert lines[0] == after
    rows = lines[1].splitlines()[1:]
    assert [row.split()[0] for row in rows] == list(by_type) and all(row.endswith(" -") for row in rows)
    assert lines[2] == report.summary() and len(lines) == 4
    assert "generation" not in lines[3] and "guard" not in lines[3] and "evaluation 0.5" in lines[3]
    assert lines[3].endswith("; total 3.0 s; peak RSS 1.00 GiB")
