"""A model out of every run: a Hugging Face folder from the trained model or from any checkpoint of a run folder.

``pretrain`` ends by writing ``<output_dir>/model`` (``save_pretrained`` + tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads as it is; INT8 / INT4 ``QuantLinear`` weights (Q-GaLore) are
dequantized to the run's dtype on the way, one layer at a time on the CPU, so the trained model is left untouched
and no second device copy of it exists. ``finetune`` writes a WeLore folder instead (``save_compressed``: its
low-rank layers are not a transformers class). ``lowrank-train export RUN_DIR [--step N] [--out DIR]`` rebuilds the
model of any checkpoint from the config saved next to it and writes the same folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_train.train.checkpoint import checkpoint_root, latest_checkpoint, load_state, read_meta
from lowrank_train.train.config import ConfigError, TrainConfig, config_from_dict

MODEL_FOLDER = "model"


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


def save_hf_model(model: nn.Module, tokenizer: Any, folder: str | os.PathLike[str], dtype: torch.dtype) -> Path:
    """Writes ``folder`` (replacing it whole, atomically) with ``save_pretrained`` of the dense model + tokenizer.

    Args:
        model: a transformers ``PreTrainedModel`` (``QuantLinear`` layers allowed; they are dequantized).
        tokenizer: saved next to the weights (``None``: weights only).
        folder: destination folder.
        dtype: dtype of the saved weights.

    Raises:
        ValueError: ``model`` is not a transformers model (it has no ``config`` to rebuild it from).
    """
    from transformers import AutoModelForCausalLM

    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise ValueError(f"export needs a transformers model with a config, got {type(model).__name__}")
    state = dense_state_dict(model, dtype)
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
    return _write_folder(Path(folder), lambda staging: _save(dense, tokenizer, staging))


def _save(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _write_folder(folder: Path, write: Any) -> Path:
    """Runs ``write(staging)`` in a sibling folder, then renames it to ``folder`` (a crash leaves no half model)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model folder
    try:
        write(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_run_model(
    model: nn.Module, tokenizer: Any, folder: str | os.PathLike[str], *, mode: str, dtype: torch.dtype
) -> Path:
    """The model folder a run leaves: a Hugging Face folder (``pretrain``) or a WeLore one (``finetune``)."""
    if mode == "finetune":
        from lowrank_train.train.run_dir import save_model_folder

        return _write_folder(Path(folder), lambda staging: save_model_folder(model, tokenizer, staging))
    return save_hf_model(model, tokenizer, folder, dtype)


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
    run_dir: str | os.PathLike[str], *, step: int | None = None, out: str | os.PathLike[str] | None = None
) -> Path:
    """Rebuilds the model of a checkpoint from its saved config and writes its model folder.

    The model is built as the run built it (shapes, or ``model.pretrained``; INT8 weights for Q-GaLore), on the
    CPU; ``state.pt`` is read with ``weights_only=True``.

    Args:
        run_dir: a run folder written by ``lowrank-train pretrain`` / ``finetune``.
        step: the checkpoint's step (``None``: the newest).
        out: destination (default ``<run_dir>/model``, or ``<run_dir>/model-step-<N>`` with ``step``).

    Returns:
        The folder written.

    Raises:
        FileNotFoundError: no such run folder or checkpoint.
        ConfigError: the saved config no longer loads (e.g. an optimizer method that is not registered).
    """
    from lowrank_train.train.model import build_model
    from lowrank_train.train.setup import load_run_tokenizer, prepare_model, resolve_dtype

    folder = checkpoint_folder(run_dir, step)
    meta = read_meta(folder)
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
    model.load_state_dict(load_state(folder)["model"])
    model.eval()
    tokenizer = load_run_tokenizer(config.data.tokenizer, model_tokenizer)
    if out is None:
        out = Path(run_dir) / (MODEL_FOLDER if step is None else f"{MODEL_FOLDER}-step-{int(meta['step'])}")
    return save_run_model(model, tokenizer, out, mode=mode, dtype=dtype)
