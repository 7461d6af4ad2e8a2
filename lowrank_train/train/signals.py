"""SIGTERM and SIGINT mean "save and stop" (STYLE: surviving the real world).

While :func:`stop_on_signals` is active (main thread only), the first SIGTERM or SIGINT only sets
:attr:`StopRequest.signum`; the loop finishes the step in progress, writes a checkpoint and raises
:class:`RunInterrupted`, whose exit status is ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT, the shell's
convention). A second signal ends the process at once with that status (the run lock is released by the kernel;
the last complete checkpoint stays, as after a crash).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The documented exit status of a run stopped by ``signum``: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


class RunInterrupted(SystemExit):
    """A run stopped by a signal after writing its checkpoint; ``code`` is :func:`exit_status` of the signal.

    A ``SystemExit`` so that the console script ends with that status; library callers can catch it.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(exit_status(signum))
        self.message, self.signum = message, signum

    def __str__(self) -> str:
        return self.message


@dataclass
class StopRequest:
    """The signal received so far (``None``: keep training)."""

    signum: int | None = None

    @property
    def name(self) -> str:
        """``SIGTERM`` / ``SIGINT``."""
        return signal.Signals(self.signum).name if self.signum is not None else ""


def _say(text: str) -> None:
    # os.write, not sys.stderr: the handler may run in the middle of another write to that buffered stream.
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank gets the signal; one says so
        return
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):  # no usable descriptor (a captured stream)
        pass


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Installs the handlers for the ``with`` block and restores the previous ones after it.

    Off the main thread (where Python cannot install handlers) nothing is installed and the request never fires.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if request.signum is not None:  # the second signal: no more waiting
            _say(f"\n{name} again: exiting now without a checkpoint\n")
            os._exit(exit_status(signum))
        request.signum = signum
        _say(f"\n{name}: finishing this step, then saving a checkpoint (send it again to exit at once)\n")

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
