"""``lowrank-train compress``: WeLore-compress a pretrained model and measure held-out perplexity before and after.

Its output folder is what ``lowrank-train finetune`` (the training loop in ``finetune`` mode) starts from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowrank_train.folders import FolderExistsError, is_empty_folder
from lowrank_train.progress_bar import PhaseProgress
from lowrank_train.train.config import ConfigError, TrainConfig
from lowrank_train.train.evaluation import evaluate, num_batches, perplexity
from lowrank_train.train.metrics import peak_memory_bytes
from lowrank_train.train.model import build_model, count_parameters
from lowrank_train.train.run_dir import SUMMARY_FILE, write_json
from lowrank_train.train.setup import load_run_data, load_run_tokenizer, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from lowrank_train.welore import CompressionReport

logger = logging.getLogger(__name__)
MODEL_FOLDER = "model"
REPORT_FILE = "compress_report.json"


def compress(
    config: TrainConfig,
    *,
    log: Callable[[str], None] = logger.info,
    overwrite: bool = False,
    progress: bool = True,
    per_matrix: bool = False,
) -> dict[str, Any]:
    """Compress ``model.pretrained`` with WeLore, measure held-out perplexity before and after, save the result.

    The compressed model (with its tokenizer) goes to ``<run.output_dir>/model``, ready for
    ``lowrank-train finetune`` with ``model.pretrained`` pointing there. It is written whole or not at all
    (:func:`lowrank_train.folders.write_folder`); the compression report (per matrix and per matrix type: ranks
    kept, LRC or dense; under the default ``strategy=auto``, each guard candidate's held-out loss, the winner and its
    margin; the seconds of each phase, ``phase_seconds``, the held-out evaluations' included, the total
    ``seconds`` and the process's ``peak_memory_bytes``) goes to ``<run.output_dir>/compress_report.json``. An
    existing non-empty ``model`` folder is refused before anything is built, unless ``overwrite`` (or
    ``run.overwrite``).

    Args:
        config: the run's config (``model.pretrained``, ``compress.*``, ``data.*``, ``run.*``).
        log: receives the progress lines and the closing report (:func:`closing_report`).
        overwrite: replace an existing, non-empty ``<run.output_dir>/model``.
        progress: show each phase (:mod:`lowrank_train.progress_bar`): a tqdm bar in a terminal, plain lines with
            an ETA through ``log`` otherwise.
        per_matrix: the closing report also has a row per matrix (``--per-matrix``); it is always in the report file.

    Returns:
        The summary (also in ``summary.json``): perplexity before/after, parameters before/after, ranks.

    Raises:
        ConfigError: no ``model.pretrained``.
        FolderExistsError: ``<run.output_dir>/model`` holds files and neither ``overwrite`` nor ``run.overwrite``.
    """
    from lowrank_train.welore import compress_model, save_compressed

    if config.model.pretrained is None:
        raise ConfigError(
            "compress needs model.pretrained (a model folder, hub id, smollm2-offline or gemma3-offline)"
        )
    spec = config.compress
    welore_config = spec.welore_config()
    device = resolve_device(config.run.device)
    if config.run.num_threads is not None:
        torch.set_num_threads(config.run.num_threads)
    output = Path(config.run.output_dir)
    folder = output / MODEL_FOLDER
    overwrite = overwrite or config.run.overwrite
    if folder.exists() and not overwrite and not is_empty_folder(folder):
        raise FolderExistsError(
            f"{folder} already holds a model: pass --overwrite (or run.overwrite=true) to replace it, or choose "
            "another run.output_dir"
        )
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    phases = PhaseProgress(enabled=progress, log=log)
    torch.manual_seed(config.run.seed)
    model, model_tokenizer = build_model(config.model, resolve_dtype(config.run.dtype))
    tokenizer = load_run_tokenizer(config.data.tokenizer, model_tokenizer)
    packed = load_run_data(config, tokenizer, model.get_input_embeddings().num_embeddings)
    model.to(device)
    batch, eval_batches = config.data.batch_size, config.run.eval_batches
    params_before = count_parameters(model)
    heldout = packed.heldout
    loss_before = evaluate_with_progress(phases, model, heldout, batch, eval_batches, device, "before compression")
    log(f"before: eval loss {loss_before:.4f}, perplexity {perplexity(loss_before):.2f}, {params_before:,} parameters")
    calibration = packed.train[: spec.calibration_sequences].to(device)
    report = compress_model(model, welore_config, calibration=calibration, progress=phases)
    params_after = count_parameters(model)
    loss_after = evaluate_with_progress(phases, model, heldout, batch, eval_batches, device, "after compression")
    save_compressed(model, folder, tokenizer=tokenizer, overwrite=overwrite)
    summary = {
        "mode": "compress",
        "eval_loss_before": loss_before,
        "perplexity_before": perplexity(loss_before),
        "eval_loss_after": loss_after,
        "perplexity_after": perplexity(loss_after),
        "parameters_before": params_before,
        "parameters_after": params_after,
        "report": report.to_dict(),
        "model_dir": str(folder),
    }
    timing = {
        "phase_seconds": {**report.phase_seconds, "evaluation": phases.seconds["evaluation"]},
        "seconds": time.perf_counter() - started,
        "peak_memory_bytes": peak_memory_bytes(device),
    }
    write_json(output / REPORT_FILE, {**report.to_dict(), **timing})
    write_json(output / SUMMARY_FILE, summary)
    for line in closing_report(report, summary, timing, device, per_matrix=per_matrix):
        log(line)
    log(f"compressed model saved to {folder}; the report above is in {output / REPORT_FILE}")
    return summary


def evaluate_with_progress(
    phases: PhaseProgress,
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    when: str,
) -> float:
    """:func:`~lowrank_train.train.evaluation.evaluate` as an ``"evaluation"`` phase of ``phases``, one step per batch.

    A tqdm bar in a terminal, plain lines with an ETA elsewhere; the seconds of every evaluation add up under
    ``phases.seconds["evaluation"]``.

    Args:
        phases: the job's progress.
        model, blocks, batch_size, max_batches, device: as for ``evaluate``.
        when: the note naming this evaluation (``"before compression"``).

    Returns:
        The mean held-out token loss.
    """
    total = num_batches(blocks, batch_size, max_batches)
    with phases.phase("evaluation", total, "batches", note=when) as advance:
        return evaluate(model, blocks, batch_size, max_batches, device, on_batch=advance)


def closing_report(
    report: CompressionReport,
    summary: dict[str, Any],
    timing: dict[str, Any],
    device: torch.device,
    *,
    per_matrix: bool = False,
) -> list[str]:
    """The lines ``compress`` ends with: perplexity after, the table per matrix type, the totals, the guard, time
    per phase and peak memory (every number is also in ``compress_report.json``).

    Args:
        report: the :class:`~lowrank_train.welore.CompressionReport`.
        summary: ``compress``'s summary (perplexities, parameter counts).
        timing: ``phase_seconds``, ``seconds`` and ``peak_memory_bytes``.
        device: the model's device (the peak is GPU memory allocated on a GPU, the process's peak RSS on the CPU).
        per_matrix: add :meth:`~lowrank_train.welore.CompressionReport.matrix_table` after the table per type.
    """
    loss, params = summary["eval_loss_after"], summary["parameters_after"]
    removed = 1.0 - params / summary["parameters_before"]
    lines = [
        f"after: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f} (before {summary['perplexity_before']:.2f}),"
        f" {params:,} parameters ({removed:.1%} of the model removed)",
        report.table(),
        *([report.matrix_table()] if per_matrix else []),
        report.summary(),
    ]
    if report.guard is not None:
        lines.append(report.guard.summary())
    phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in timing["phase_seconds"].items() if seconds > 0)
    memory = "GPU memory allocated" if device.type == "cuda" else "RSS"
    lines.append(
        f"seconds: {phases}; total {timing['seconds']:.1f} s; peak {memory} {timing['peak_memory_bytes'] / 2**30:.2f}"
        " GiB"
    )
    return lines
