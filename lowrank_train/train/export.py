"""A model out of every run: a Hugging Face folder from the trained model or from any checkpoint of a run folder.

``pretrain`` ends by writing ``<output_dir>/model`` (``save_pretrained`` + tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads as it is; INT8 / INT4 ``QuantLinear`` weights (Q-GaLore) are
dequantized to the run's dtype on the way, one layer at a time on the CPU, so the trained model is left untouched
and no second device copy of it exists. ``finetune`` writes a WeLore folder instead (``save_compressed``: its
low-rank layers are not a transformers class). ``lowrank-train export RUN_DIR [--step N] [--out DIR]`` rebuilds the
model of any checkpoint from the config saved next to it and writes the same folder; a sharded (FSDP2, DCP)
checkpoint of any number of ranks is assembled in the one process that exports it.

What it refuses (issue 20 items 2 and 8): ``--out`` may not be the run folder, a folder holding the run, or anything
inside the run other than its ``model/`` / ``model-step-N/`` (even with ``--overwrite``: that would replace the
checkpoints). Any other non-empty folder is replaced only when it is an earlier export (it holds
:data:`EXPORT_MARKER`; for the run's own ``model/`` folders a ``config.json`` with weights also counts), or with
``--overwrite``. Every folder is written through :func:`lowrank_train.folders.write_folder`: the previous one stays
whole until the new one is complete. The checkpoint is verified (size and sha256) exactly as ``--resume`` does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_train.folders import is_empty_folder, write_folder
from lowrank_train.train.checkpoint import (
    CheckpointError,
    checkpoint_root,
    latest_checkpoint,
    load_state,
    resolve_checkpoints,
    verify_checkpoint,
)
from lowrank_train.train.config import ConfigError, TrainConfig, config_from_dict

MODEL_FOLDER = "model"
# Written into every model folder a run or an export leaves: what it is and where it came from.
EXPORT_MARKER = "lowrank_train_export.json"
EXPORT_FORMAT = "lowrank_train.export/1"
_RUN_MODEL_FOLDER = re.compile(rf"^{MODEL_FOLDER}(-step-\d+)?$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class ExportError(ValueError):
    """An export destination that would destroy something, or a checkpoint that cannot be exported."""


def dense_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU as a plain model holds it: every ``QuantLinear`` weight dequantized.

    Args:
        model: a transformers model, possibly with ``QuantLinear`` block linears (INT8 codes + fp32 scales).
        dtype: dtype of the floating tensors in the result (the run's parameter dtype).

    Returns:
        ``{key: CPU tensor}`` with the keys of the same architecture built from ``nn.Linear`` layers.
    """
    from lowrank_train.nn import QuantLinear

    quantized = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized:
            continue  # codes and scales: replaced by the dequantized weight below
        state[key] = value.detach().to("cpu", dtype=dtype if value.is_floating_point() else value.dtype)
    with torch.no_grad():
        for name, module in quantized.items():
            # One layer at a time: the dense weight exists on the device only for this layer.
            state[f"{name}.weight"] = module.dequantized_weight(dtype).to("cpu")
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().to("cpu", dtype=dtype)
    return state


def save_hf_model(
    model: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike[str],
    dtype: torch.dtype,
    *,
    overwrite: bool = True,
    provenance: Mapping[str, Any] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Writes ``folder`` (replacing it whole, atomically) with ``save_pretrained`` of the dense model + tokenizer.

    Args:
        model: a transformers ``PreTrainedModel`` (``QuantLinear`` layers allowed; they are dequantized).
        tokenizer: saved next to the weights (``None``: weights only).
        folder: destination folder.
        dtype: dtype of the saved weights.
        overwrite: replace an existing, non-empty ``folder``.
        provenance: what the folder was made from, recorded in :data:`EXPORT_MARKER`.
        state: the whole model's float state when ``model`` cannot give it itself (an FSDP2 model holds shards:
            :func:`lowrank_train.train.sharded.full_model_state`); ``None`` reads ``model``.

    Raises:
        ValueError: ``model`` is not a transformers model (it has no ``config`` to rebuild it from).
        FolderExistsError: ``folder`` holds files and ``overwrite`` is False.
    """
    from transformers import AutoModelForCausalLM

    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise ValueError(f"export needs a transformers model with a config, got {type(model).__name__}")
    if state is None:
        state = dense_state_dict(model, dtype)
    else:
        state = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    config = type(model.config).from_dict(model.config.to_dict())
    # Built on the meta device and given the CPU tensors: no initialisation and no second copy of the weights.
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"export: the weights do not match {type(dense).__name__}: missing {missing}, unexpected {unexpected}"
        )
    dense.tie_weights()
    with write_folder(folder, overwrite=overwrite) as staging:
        dense.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _write_marker(staging, "pretrain", provenance)
    return Path(folder)


def _write_marker(folder: Path, mode: str, provenance: Mapping[str, Any] | None) -> None:
    record = {"format": EXPORT_FORMAT, "mode": mode, **dict(provenance or {})}
    (folder / EXPORT_MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_run_model(
    model: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike[str],
    *,
    mode: str,
    dtype: torch.dtype,
    overwrite: bool = True,
    provenance: Mapping[str, Any] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """The model folder a run leaves: a Hugging Face folder (``pretrain``) or a WeLore one (``finetune``).

    Args:
        overwrite: replace an existing, non-empty ``folder`` (a run replaces its own ``model/``).
        provenance: what the folder was made from, recorded in :data:`EXPORT_MARKER`.
        state: the whole model's state for a sharded ``model`` (``pretrain`` only; see :func:`save_hf_model`).
    """
    if mode == "finetune":
        from lowrank_train.welore.io import write_compressed_files

        with write_folder(folder, overwrite=overwrite) as staging:
            write_compressed_files(model, staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            _write_marker(staging, mode, provenance)
        return Path(folder)
    return save_hf_model(model, tokenizer, folder, dtype, overwrite=overwrite, provenance=provenance, state=state)


def is_earlier_export(folder: str | os.PathLike[str], *, run_model_folder: bool = False) -> bool:
    """True when ``folder`` holds :data:`EXPORT_MARKER` (or, for a run's own ``model/``, a config with weights)."""
    folder = Path(folder)
    if (folder / EXPORT_MARKER).is_file():
        return True
    if not run_model_folder:
        return False
    has_weights = any((folder / name).is_file() for name in _WEIGHT_FILES)
    return has_weights and ((folder / "config.json").is_file() or (folder / "welore.json").is_file())


def check_export_target(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Refuse an export destination that would replace the run or a folder that is not an earlier export.

    Raises:
        ExportError: ``out`` is the run folder, holds it, lies inside it (other than its ``model/`` or
            ``model-step-N/``), is a file, or is a non-empty folder that is not an earlier export (unless
            ``overwrite``); the message names the path and what to do.
    """
    run, target = Path(run_dir).resolve(), Path(out).resolve()
    if target == run or target in run.parents:
        what = "the run folder" if target == run else f"a folder that holds the run folder {run}"
        raise ExportError(
            f"export --out {out} is {what}: writing there would replace its checkpoints. Choose another --out "
            f"(default {Path(run_dir) / MODEL_FOLDER})"
        )
    inside = run in target.parents
    if inside and not (target.parent == run and _RUN_MODEL_FOLDER.match(target.name)):
        raise ExportError(
            f"export --out {out} lies inside the run folder {run_dir}: only its {MODEL_FOLDER}/ or "
            f"{MODEL_FOLDER}-step-N/ may be written there. Choose a folder outside the run"
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"export --out {out} is a file, not a folder: choose another --out")
    if target.is_dir() and not is_empty_folder(target) and not is_earlier_export(target, run_model_folder=inside):
        if not overwrite:
            raise ExportError(
                f"export --out {out} is a non-empty folder that is not an earlier export (no {EXPORT_MARKER}): "
                "pass --overwrite to replace it whole, or choose an empty or new folder"
            )


def choose_checkpoint(
    run_dir: str | os.PathLike[str], step: int | None, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to export, verified (size and sha256 of ``state.pt``) as ``--resume`` verifies it.

    Without ``step`` it is the newest checkpoint that verifies; every one passed over is logged with the reason
    (nothing is moved: an export only reads the run). With ``step`` that checkpoint must verify.

    Returns:
        ``(checkpoint folder, its meta)``.

    Raises:
        FileNotFoundError: no such run folder or checkpoint.
        CheckpointError: the checkpoint (every checkpoint, without ``step``) failed verification; names the file.
    """
    if step is not None:
        folder = checkpoint_folder(run_dir, step)
        try:
            meta = verify_checkpoint(folder)
        except CheckpointError as error:
            raise CheckpointError(f"export --step {step} refused: {error}; export another --step") from error
        log(f"export: checkpoint {folder} (step {step}, as asked; size and sha256 verified)")
        return folder, meta
    checkpoint_folder(run_dir, None)  # a missing run folder or checkpoint: the FileNotFoundError names it
    resolved = resolve_checkpoints(run_dir, set_aside=False)
    for note in resolved.notes:
        log(f"export: {note}")
    if resolved.folder is None:
        listed = "; ".join(reason for _, reason in resolved.rejected)
        raise CheckpointError(f"export: no checkpoint of {run_dir} verifies ({listed}); restore the file")
    log(f"export: checkpoint {resolved.folder} (step {resolved.meta.get('step')}, the newest that verifies)")
    return resolved.folder, resolved.meta


def checkpoint_folder(run_dir: str | os.PathLike[str], step: int | None = None) -> Path:
    """The checkpoint of ``run_dir`` at ``step`` (``None``: the newest).

    Raises:
        FileNotFoundError: no such run folder or checkpoint; the message lists the steps there are.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    if step is None:
        folder = latest_checkpoint(run)
        if folder is None:
            raise FileNotFoundError(f"{run} holds no checkpoint (looked in {checkpoint_root(run)})")
        return folder
    folder = checkpoint_root(run) / f"step-{step:08d}"
    if not folder.is_dir():
        steps = sorted(int(p.name.split("-")[1]) for p in checkpoint_root(run).glob("step-*") if p.is_dir())
        raise FileNotFoundError(f"{run} has no checkpoint at step {step}; its checkpoints are at steps {steps}")
    return folder


def export_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Rebuilds the model of a checkpoint from its saved config and writes its model folder.

    The model is built as the run built it (shapes, or ``model.pretrained``; INT8 weights for Q-GaLore), on the
    CPU; ``state.pt`` is verified (:func:`choose_checkpoint`) and read with ``weights_only=True``.

    Args:
        run_dir: a run folder written by ``lowrank-train pretrain`` / ``finetune``.
        step: the checkpoint's step (``None``: the newest that verifies).
        out: destination (default ``<run_dir>/model``, or ``<run_dir>/model-step-<N>`` with ``step``); see the
            module docstring for what is refused.
        overwrite: replace a non-empty ``out`` that is not an earlier export.
        log: receives which checkpoint is exported and why others were passed over (default: dropped).

    Returns:
        The folder written.

    Raises:
        FileNotFoundError: no such run folder or checkpoint.
        CheckpointError: the checkpoint failed verification (the message names the file).
        ExportError: ``out`` is refused (see :func:`check_export_target`).
        ConfigError: the saved config no longer loads (e.g. an optimizer method that is not registered).
    """
    from lowrank_train.train.model import build_model
    from lowrank_train.train.setup import load_run_tokenizer, prepare_model, resolve_dtype
    from lowrank_train.train.sharded import is_sharded_checkpoint, load_sharded_model

    say = log or (lambda line: None)
    if out is None:
        checkpoint_folder(run_dir, step)  # names a missing run or step before anything else
        out = Path(run_dir) / (MODEL_FOLDER if step is None else f"{MODEL_FOLDER}-step-{step}")
    check_export_target(run_dir, out, overwrite=overwrite)
    folder, meta = choose_checkpoint(run_dir, step, say)
    try:
        config: TrainConfig = config_from_dict(meta["config"])
    except ConfigError as error:
        raise ConfigError(f"the config saved in {folder} does not load: {error}") from error
    mode = meta.get("mode", "pretrain")
    dtype = resolve_dtype(config.run.dtype)
    torch.manual_seed(config.run.seed)
    model, model_tokenizer = build_model(
        config.model,
        dtype,
        weight_bits=config.optimizer.resolved_weight_bits if mode == "pretrain" else None,
        weight_group_size=config.optimizer.weight_group_size,
        seed=config.run.seed,
    )
    if mode == "pretrain":  # INT8 weights of a pretrained model are made here, as in the run
        model = prepare_model(model, config, torch.device("cpu"))
    if is_sharded_checkpoint(meta):  # DCP shards of any number of ranks, assembled in this one process
        load_sharded_model(folder, model)
    else:
        model.load_state_dict(load_state(folder)["model"])
    model.eval()
    tokenizer = load_run_tokenizer(config.data.tokenizer, model_tokenizer)
    provenance = {"run": str(Path(run_dir).resolve()), "checkpoint": folder.name, "step": int(meta["step"])}
    return save_run_model(model, tokenizer, out, mode=mode, dtype=dtype, overwrite=True, provenance=provenance)
