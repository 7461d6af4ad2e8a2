"""``lowrank-train compress``: WeLore-compress a pretrained model and measure held-out perplexity before and after.

Its output folder is what ``lowrank-train finetune`` (the training loop in ``finetune`` mode) starts from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowrank_train.folders import FolderExistsError, is_empty_folder
from lowrank_train.progress_bar import PhaseProgress
from lowrank_train.train.config import ConfigError, TrainConfig
from lowrank_train.train.evaluation import evaluate, perplexity
from lowrank_train.train.metrics import peak_memory_bytes
from lowrank_train.train.model import build_model, count_parameters
from lowrank_train.train.run_dir import SUMMARY_FILE, write_json
from lowrank_train.train.setup import load_run_data, load_run_tokenizer, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)
MODEL_FOLDER = "model"
REPORT_FILE = "compress_report.json"


def compress(
    config: TrainConfig,
    *,
    log: Callable[[str], None] = logger.info,
    overwrite: bool = False,
    progress: bool = True,
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
        log: receives the progress lines.
        overwrite: replace an existing, non-empty ``<run.output_dir>/model``.
        progress: show each phase (:mod:`lowrank_train.progress_bar`): a tqdm bar in a terminal, plain lines with
            an ETA through ``log`` otherwise.

    Returns:
        The summary (also in ``summary.json``): perplexity before/after, parameters before/after, ranks.

    Raises:
        ConfigError: no ``model.pretrained``.
        FolderExistsError: ``<run.output_dir>/model`` holds files and neither ``overwrite`` nor ``run.overwrite``.
    """
    from lowrank_train.welore import compress_model, save_compressed

    if config.model.pretrained is None:
        raise ConfigError("compress needs model.pretrained (a model folder, hub id or smollm2-offline)")
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
    with phases.phase("evaluation"):
        loss_before = evaluate(model, packed.heldout, batch, eval_batches, device)
    log(f"before: eval loss {loss_before:.4f}, perplexity {perplexity(loss_before):.2f}, {params_before:,} parameters")
    calibration = packed.train[: spec.calibration_sequences].to(device)
    report = compress_model(model, welore_config, calibration=calibration, progress=phases)
    log(report.summary())
    if report.guard is not None:
        log(report.guard.summary())
    params_after = count_parameters(model)
    with phases.phase("evaluation"):
        loss_after = evaluate(model, packed.heldout, batch, eval_batches, device)
    log(f"after: eval loss {loss_after:.4f}, perplexity {perplexity(loss_after):.2f}, {params_after:,} parameters")
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
    log(f"compressed model saved to {folder}")
    return summary
