"""Start-up time of ``lowrank-train``: ``--help``, argument and config errors, ``estimate`` (issue 15 item 6).

Each command runs as a whole fresh process several times; the table gives wall-clock and CPU (user + sys) seconds
as min / median. CPU seconds are the steadier figure on a shared machine. ``--before REV`` also times the package
as it was at a git revision (extracted with ``git archive`` into a temporary folder; the repository is not
touched), with the same interpreter and dependencies.

    python benchmarks/cli_startup.py --runs 5 --before d0adba7
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cli_startup.md"
DEMO = "recipes/configs/demo.yaml"
BIG = "recipes/configs/llama_7b_qgalore_16gb.yaml"
CLI = "import sys; from lowrank_train.cli import main; sys.exit(main(sys.argv[1:]))"
# (label, argv after `python`)
COMMANDS = [
    ("python -c pass (interpreter)", ["-c", "pass"]),
    ('python -c "import torch"', ["-c", "import torch"]),
    ("lowrank-train --help", ["-c", CLI, "--help"]),
    ("lowrank-train pretrain (missing argument)", ["-c", CLI, "pretrain"]),
    (
        "lowrank-train pretrain demo.yaml optimizer.nme=1 (config error)",
        ["-c", CLI, "pretrain", DEMO, "optimizer.nme=1"],
    ),
    ("lowrank-train estimate demo.yaml", ["-c", CLI, "estimate", DEMO]),
    ("lowrank-train estimate llama_7b_qgalore_16gb.yaml", ["-c", CLI, "estimate", BIG]),
]


def time_once(argv: list[str], checkout: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit status) of one run of the package in ``checkout``.

    The process runs in ``checkout`` (``python -c`` puts the working directory first on ``sys.path``, so that is the
    ``lowrank_train`` it imports) with ``checkout`` also on ``PYTHONPATH``.
    """
    import time

    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def measure(checkout: Path, runs: int) -> dict[str, tuple[list[float], list[float], set[int]]]:
    results = {}
    for label, argv in COMMANDS:
        time_once(argv, checkout)  # warm-up: file cache
        samples = [time_once(argv, checkout) for _ in range(runs)]
        results[label] = ([w for w, _, _ in samples], [c for _, c, _ in samples], {s for _, _, s in samples})
    return results


def cell(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f}"


def table(after: dict, before: dict | None, runs: int) -> str:
    head = "| command | exit | after: wall s (min / median) | after: CPU s |"
    rule = "|---|---|---|---|"
    if before is not None:
        head += " before: wall s | before: CPU s | CPU median before / after |"
        rule += "---|---|---|"
    lines = [head, rule]
    for label, _ in COMMANDS:
        walls, cpus, codes = after[label]
        row = f"| {label} | {','.join(map(str, sorted(codes)))} | {cell(walls)} | {cell(cpus)} |"
        if before is not None:
            b_walls, b_cpus, _ = before[label]
            ratio = statistics.median(b_cpus) / max(statistics.median(cpus), 1e-9)
            row += f" {cell(b_walls)} | {cell(b_cpus)} | {ratio:.1f}x |"
        lines.append(row)
    lines.append("")
    python = sys.version.split()[0]
    lines.append(f"{runs} runs per command after a warm-up; whole processes; {os.cpu_count()} CPUs; python {python}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", default=None, help="git revision to compare against")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results file")
    args = parser.parse_args()
    before = None
    if args.before:
        folder = Path(tempfile.mkdtemp(prefix="cli_startup_before_"))
        try:
            archive = subprocess.run(
                ["git", "archive", args.before, "lowrank_train", "recipes"], cwd=REPO, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
            before = measure(folder, args.runs)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    after = measure(REPO, args.runs)
    text = table(after, before, args.runs)
    print(text)  # noqa: T201
    if not args.no_write:
        title = "# lowrank-train start-up (benchmarks/cli_startup.py)\n\n"
        note = f"\nbefore = `{args.before}`, after = the working tree.\n" if args.before else "\n"
        RESULTS.write_text(title + text + "\n" + note, encoding="utf-8")


if __name__ == "__main__":
    main()
