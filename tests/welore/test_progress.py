"""compress_model's progress (issue 24 item 2): plain lines per phase off a terminal, silence by default, timings."""

import io
import time

import pytest

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
    assert _done(lines) == ["calibration"] + [p for name in candidates for p in [*_phases_of(name), "guard"]]
    assert [line for line in lines if line.startswith("guard: candidate ")] == [
        f"guard: candidate {n}/{len(candidates)} {name}" for n, name in enumerate(candidates, 1)
    ]
    for phase in ("spectra", "factors"):
        assert f"{phase}: 2 blocks" in lines
    assert any(line.startswith("spectra 1/2 blocks | ETA ") for line in lines)
    assert any(line.startswith("generation: 31 steps (") for line in lines)
    assert lines[-1].startswith(f"guard: {candidates[-1]} held-out loss ")
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
