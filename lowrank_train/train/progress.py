"""What a run shows while it trains: a tqdm bar in a terminal, plain log lines everywhere else.

In a terminal (``sys.stdout.isatty()``) one bar counts the optimizer steps and shows the last step's loss,
learning rate, tokens/s and peak memory; tqdm adds elapsed time and the ETA. Other messages (held-out evaluations)
are printed above the bar. Anywhere else (a log file, a pipe, a notebook capture, CI) the run logs one line every
``run.log_every`` steps, the same numbers with an ETA, so logs stay greppable::

    step 40/60 | loss 6.1234 | lr 2.51e-03 | 10,240 tok/s | peak mem 1.21 GiB | ETA 0:00:12
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowrank_train.memory import format_bytes
from lowrank_train.progress_bar import format_eta, is_terminal

Log = Callable[[str], None]


@dataclass(frozen=True)
class StepStats:
    """The numbers shown for one optimizer step (or a window of steps)."""

    step: int
    loss: float
    lr: float
    tokens_per_s: float
    peak_memory_bytes: int


def _is_terminal() -> bool:
    """stdout is a terminal with a width (read when called, so a test's replaced stdout counts)."""
    return is_terminal(sys.stdout)


def progress_line(stats: StepStats, total: int, eta_seconds: float | None) -> str:
    """The plain progress line of :mod:`lowrank_train.train.progress`'s docstring."""
    line = (
        f"step {stats.step}/{total} | loss {stats.loss:.4f} | lr {stats.lr:.2e} | {stats.tokens_per_s:,.0f} tok/s | "
        f"peak mem {format_bytes(stats.peak_memory_bytes)}"
    )
    return line if eta_seconds is None else f"{line} | ETA {format_eta(eta_seconds)}"


class RunProgress:
    """Progress of one run from step ``start`` to ``total``.

    Args:
        total: the run's last step (``run.max_steps``).
        start: steps already done (a resumed run starts its bar and ETA there).
        log: where plain lines go (also messages, see :meth:`wrap`).
        interactive: draw a bar; ``None`` decides by ``sys.stdout.isatty()``.
        file: the bar's stream (default ``sys.stdout``, the stream that was checked).
    """

    def __init__(self, *, total: int, start: int, log: Log, interactive: bool | None = None, file: Any = None) -> None:
        self.total, self.start, self._log = total, start, log
        self.interactive = _is_terminal() if interactive is None else interactive
        self._started = time.perf_counter()
        self._bar = None
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=start, file=file or sys.stdout, unit="step", dynamic_ncols=True, leave=True
            )

    def wrap(self, log: Log) -> Log:
        """``log`` made safe to call while the bar is drawn: the bar steps aside for the message, then redraws."""
        if self._bar is None:
            return log

        def write_above_bar(line: str) -> None:
            if self._bar is None:  # closed: the run's closing lines
                log(line)
                return
            from tqdm import tqdm

            with tqdm.external_write_mode(file=self._bar.fp):
                log(line)

        return write_above_bar

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left at this process's average pace so far (``None`` before its first step)."""
        done_here = step - self.start
        if done_here <= 0:
            return None
        return (time.perf_counter() - self._started) / done_here * (self.total - step)

    def step(self, stats: StepStats) -> None:
        """One optimizer step done: advance the bar (terminal) and show its numbers."""
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"loss {stats.loss:.4f} | lr {stats.lr:.2e} | {stats.tokens_per_s:,.0f} tok/s | "
                f"mem {format_bytes(stats.peak_memory_bytes)}",
                refresh=False,
            )
            self._bar.update(stats.step - self._bar.n)

    def interval(self, stats: StepStats) -> None:
        """A ``run.log_every`` boundary (window averages): a plain line, unless the bar already shows the run."""
        if self._bar is None:
            self._log(progress_line(stats, self.total, self.eta_seconds(stats.step)))

    def close(self) -> None:
        """Leave the finished bar on screen."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
