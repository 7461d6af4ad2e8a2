"""Run metrics: JSON lines always, TensorBoard / Weights & Biases when installed and asked for; memory probes."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank_train.memory import format_bytes  # noqa: F401  (re-exported for the loop and CLI)

METRICS_FILE = "metrics.jsonl"
logger = logging.getLogger(__name__)


class MetricsWriter:
    """Writes one JSON object per line to ``<output_dir>/metrics.jsonl`` and mirrors scalars to optional sinks.

    Args:
        output_dir: the run folder.
        sinks: any of ``"jsonl"``, ``"tensorboard"``, ``"wandb"``.
        resume_step: when resuming, records of later steps (written by the interrupted run after its last
            checkpoint) are dropped so the file reads like one uninterrupted run; so is a torn last line (a kill
            in the middle of a write), with a line in ``log``: the resumed run writes that record again.
        log: receives that warning (default: this module's logger).
        run_name: name for wandb.
        config: the run's config, logged to wandb.

    Raises:
        ModuleNotFoundError: a sink was asked for whose package is not installed.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        sinks: Sequence[str] = ("jsonl",),
        *,
        resume_step: int | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            _truncate_after(self.path, resume_step, log or logger.warning)
        self._tensorboard = None
        self._wandb = None
        if "tensorboard" in sinks:
            if importlib.util.find_spec("tensorboard") is None:
                raise ModuleNotFoundError(
                    "run.metrics has tensorboard, which is not installed: pip install tensorboard"
                )
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if "wandb" in sinks:
            if importlib.util.find_spec("wandb") is None:
                raise ModuleNotFoundError("run.metrics has wandb, which is not installed: pip install wandb")
            import wandb

            # Files (offline runs: WANDB_MODE=offline) go into the run folder, not the working directory.
            self._wandb = wandb.init(name=run_name, config=dict(config or {}), resume="allow", dir=str(output_dir))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (must have ``"step"`` and ``"split"``) and send its numbers to the other sinks."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record), sort_keys=True) + "\n")
        step = int(record["step"])
        scalars = {
            f"{record['split']}/{k}": v
            for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float))
        }
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close the optional sinks."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (a torn last line, left by a kill mid-write, is left out).

    Raises:
        ValueError: a line other than the last is not a JSON record (the message names the file and line).
    """
    path = Path(output_dir) / METRICS_FILE
    return [record for _, record in _parse_lines(path)[0]]


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """``([(line, record)], torn last line or None)``; a bad line elsewhere is a ValueError naming it."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    parsed: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as error:
            if number == len(lines):
                return parsed, line
            raise ValueError(
                f"{path} line {number} is not a JSON metrics record ({error}); fix or delete that line"
            ) from None
        parsed.append((line, record))
    return parsed, None


def _truncate_after(path: Path, step: int, log: Callable[[str], None]) -> None:
    if not path.exists():
        path.write_text("", encoding="utf-8")
        return
    parsed, torn = _parse_lines(path)
    if torn is not None:
        log(f"{path}: dropped a torn last line (cut short by a kill): {torn[:80]!r}; the resumed run redoes it")
    kept = [line for line, record in parsed if record["step"] <= step]
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
