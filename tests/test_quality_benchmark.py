"""Pure helpers of ``benchmarks/quality.py``'s long-horizon mode: paired gaps, the best lrs read back from a saved
sweep, and the claim files that let two workers share one folder of runs."""

import importlib
import math
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("quality")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_paired_gaps_match_a_hand_computation(quality):
    # Seed 2 has no reference run and seed 3 diverged: both are left out of the pairing.
    per_seed, mean = quality.paired_gaps({0: 4.5, 1: 4.8, 2: 4.0, 3: math.nan}, {0: 5.0, 1: 5.2, 3: 5.1})
    assert per_seed == pytest.approx({0: 4.5 / 5.0 - 1, 1: 4.8 / 5.2 - 1})
    assert mean == pytest.approx((4.5 + 4.8) / (5.0 + 5.2) - 1)  # -0.088235...
    assert quality.paired_gaps({0: 4.5}, {1: 5.0}) == ({}, None)


def _saved(runs, seeds=(0, 1)):
    args = {"lrs": [1e-3, 3e-3, 1e-2, 3e-2], "start_lrs": [3e-3, 1e-2], "full_sweep": False, "seeds": list(seeds)}
    results = [{"method": m, "lr": lr, "seed": s, "eval_loss": loss} for m, lr, s, loss in runs]
    return {"args": args, "results": results[:2], "unused": results[2:]}


def test_sweep_best_lrs_replays_the_adaptive_sweep(quality):
    saved = _saved(
        [
            # done: best 1e-2 is interior once 3e-2 was tried; the seed-1 run at 3e-2 must not count.
            ("galore", 3e-3, 0, 5.0),
            ("galore", 1e-2, 0, 4.6),
            ("galore", 3e-2, 0, 4.9),
            ("galore", 3e-2, 1, 1.0),
            # unfinished: best at the low edge, 1e-3 not run yet.
            ("apollo", 3e-3, 0, 5.0),
            ("apollo", 1e-2, 0, 5.3),
            # every point diverged down to the grid's edge.
            ("fira", 1e-3, 0, math.nan),
            ("fira", 3e-3, 0, math.nan),
            ("fira", 1e-2, 0, math.nan),
        ]
    )
    best = quality.sweep_best_lrs(saved, ["galore", "apollo", "fira", "qgalore"])
    assert best == {"galore": 1e-2, "fira": None}


def test_claims_are_exclusive_and_a_dead_workers_claim_is_taken_over(quality, tmp_path):
    assert quality._claim(tmp_path, "galore", 0)
    assert not quality._claim(tmp_path, "galore", 0)  # this live process holds it
    assert quality._claimed_by_live(tmp_path, "galore", 0)
    assert quality._claim(tmp_path, "galore", 1)
    claim = quality._claim_path(tmp_path, "apollo", 0)
    claim.write_text(str(_dead_pid()))
    assert not quality._claimed_by_live(tmp_path, "apollo", 0)
    assert quality._claim(tmp_path, "apollo", 0)
    assert claim.read_text() == str(os.getpid())


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class _Parser:
    def error(self, message):
        raise SystemExit(message)


def test_long_report_pairs_seeds_names_missing_runs_and_decides_the_claim(quality, tmp_path):
    import argparse
    import json

    settings = {k: None for k in quality.RUN_SETTINGS}
    settings.update(steps=1000, warmup=100, batch=16, seq=64, hidden=128, threads=1, update_gap=50)
    sweep = _saved(
        [(m, lr, 0, loss) for m in ("adamw_grouped", "galore") for lr, loss in ((3e-3, 5.0), (1e-2, 4.9), (3e-2, 5.2))]
        + [("adamw_grouped", 1e-2, 1, 5.0), ("galore", 1e-2, 1, 4.5)]
    )
    sweep["args"].update(settings, steps=200, warmup=20)
    (tmp_path / "quality.json").write_text(json.dumps(sweep))
    args = argparse.Namespace(
        **settings,
        seeds=[0, 1],
        long_methods=["adamw_grouped", "galore", "apollo"],
        output=tmp_path,
        long_output=tmp_path / "long",
        sweep_file=tmp_path / "quality.json",
    )
    args.long_output.mkdir()
    losses = {("adamw_grouped", 0): 4.0, ("adamw_grouped", 1): 4.2, ("galore", 0): 3.68, ("galore", 1): 3.906}
    losses[("apollo", 0)] = 3.9
    for (method, seed), loss in losses.items():
        result = {"method": method, "lr": 1e-2, "seed": seed, "eval_loss": loss, "step_s": 0.5, "run_s": 600.0}
        result["train_losses"] = [6.0 - 0.01 * i for i in range(60)]
        payload = {"settings": settings, "heldout_blocks": 157, "result": result}
        quality._run_path(args.long_output, method, seed).write_text(json.dumps(payload))

    text = quality.long_report(args, _Parser())
    galore = next(line for line in text.splitlines() if line.startswith("| GaLore"))
    # 3.68 / 4.0 - 1 = -8%, 3.906 / 4.2 - 1 = -7%, paired mean (3.68 + 3.906) / 8.2 - 1 = -7.49%; at 200 steps both
    # sweeps pick 1e-2: (4.9 + 4.5) / (4.9 + 5.0) - 1 = -5.05%.
    assert "| -8.00% | -7.00% | -7.49% | -5.05% |" in galore
    apollo = next(line for line in text.splitlines() if line.startswith("| APOLLO"))
    assert "sweep unfinished" in apollo and "missing" in apollo
    assert "Missing runs: apollo seed 1." in text
    assert "**holds**" in text
    assert (tmp_path / "quality_long.md").read_text() == text
    assert (tmp_path / "quality_long_loss.png").stat().st_size > 0
