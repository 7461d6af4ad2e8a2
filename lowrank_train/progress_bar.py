"""Progress of a job made of named phases (``compress``): a tqdm bar per phase in a terminal, plain lines otherwise.

In a terminal one bar counts the current phase's items (blocks, candidates), and tqdm adds elapsed time and ETA.
Anywhere else (a log file, a pipe, CI) each phase logs a start line, a line with an ETA every tenth of its items
(or every ``every_seconds``, whichever comes first), and an end line with its seconds::

    spectra: 4 blocks
    spectra 2/4 blocks | ETA 0:00:03
    spectra done in 5.9 s

Seconds per phase are recorded whether or not anything is shown (:attr:`PhaseProgress.seconds`). It lives at the
package top so that both :mod:`lowrank_train.welore` and :mod:`lowrank_train.train` may use it (welore does not
import train).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Log = Callable[[str], None]


def is_terminal(stream: Any) -> bool:
    """``stream`` is a terminal with a width (a pseudo-terminal of width 0, e.g. under `script`, draws no bar)."""
    isatty = getattr(stream, "isatty", None)
    if not callable(isatty) or not isatty():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return True  # a terminal-like stream without a file descriptor (tests, IDE consoles)


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (days as ``1 day, H:MM:SS``), rounded to whole seconds."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class PhaseProgress:
    """Shows and times the phases of one job.

    Args:
        enabled: show progress; ``False`` only records the seconds.
        log: where plain lines go (default: print to ``file``).
        interactive: draw tqdm bars; ``None`` decides by whether ``file`` is a terminal.
        file: the stream checked and drawn on (default ``sys.stdout``).
        every_seconds: in plain mode, the longest wait between two lines of one phase.
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        log: Log | None = None,
        interactive: bool | None = None,
        file: Any = None,
        every_seconds: float = 30.0,
    ) -> None:
        self.enabled = enabled
        self.file = file if file is not None else sys.stdout
        self.interactive = enabled and (is_terminal(self.file) if interactive is None else interactive)
        self._log = log if log is not None else (lambda line: print(line, file=self.file, flush=True))
        self.every_seconds = every_seconds
        self.seconds: dict[str, float] = {}

    def message(self, line: str) -> None:
        """A line between phases (e.g. which guard candidate runs next); nothing when disabled."""
        if self.enabled:
            self._log(line)

    @contextmanager
    def phase(
        self, name: str, total: int | None = None, unit: str = "", note: str = ""
    ) -> Iterator[Callable[[], None]]:
        """Time (and show) one phase; yields ``advance()``, to call once per item of ``total``.

        ``note`` is added to the phase's first line (plain) or its bar's label (terminal).

        A phase that runs more than once (once per guard candidate) adds up its seconds.
        """
        start = time.perf_counter()
        done = 0
        last_line, next_tenth = start, 1  # integer tenths: summed floats drift (0.1 * 3 > 0.3)
        bar = None
        units = f" {unit}" if unit else ""
        if self.enabled and self.interactive:
            from tqdm import tqdm

            label = f"{name} ({note})" if note else name
            bar = tqdm(total=total, desc=label, unit=unit or "it", file=self.file, dynamic_ncols=True, leave=True)
        elif self.enabled:
            notes = f" ({note})" if note else ""
            self._log(f"{name}: {total}{units}{notes}" if total else f"{name} ...{notes}")

        def advance() -> None:
            nonlocal done, last_line, next_tenth
            done += 1
            if bar is not None:
                bar.update(1)
                return
            if not self.enabled or not total or done >= total:
                return
            now = time.perf_counter()
            if 10 * done >= next_tenth * total or now - last_line >= self.every_seconds:
                eta = (now - start) / done * (total - done)
                self._log(f"{name} {done}/{total}{units} | ETA {format_eta(eta)}")
                last_line = now
                while next_tenth * total <= 10 * done:
                    next_tenth += 1

        try:
            yield advance
        finally:
            seconds = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            if bar is not None:
                bar.close()
            elif self.enabled:
                self._log(f"{name} done in {seconds:.1f} s")
