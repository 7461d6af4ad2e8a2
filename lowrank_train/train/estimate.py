"""From a run config to the memory estimator (:mod:`lowrank_train.memory`), and the check that a run fits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lowrank_train.train.config import ConfigError, TrainConfig
from lowrank_train.train.metrics import format_bytes


def model_shape_source(config: TrainConfig) -> dict[str, Any] | Any:
    """What the estimator reads the model's shapes from: the config's own numbers, or a pretrained folder's config.

    Raises:
        ConfigError: a pretrained model whose shapes cannot be read without loading it (a hub id, smollm2-offline).
    """
    model = config.model
    if model.pretrained is None:
        return {
            "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size,
            "intermediate_size": model.intermediate_size,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_heads,
            "num_key_value_heads": model.num_kv_heads or model.num_heads,
            "tie_word_embeddings": model.tie_embeddings,
        }
    folder = Path(model.pretrained).expanduser()
    if (folder / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder)
    raise ConfigError(
        f"the estimator needs the model's shapes; model.pretrained={model.pretrained!r} is not a local folder with "
        "a config.json"
    )


def training_setup(config: TrainConfig) -> dict[str, Any]:
    """The run's settings under the estimator's names (:class:`lowrank_train.memory.TrainingSetup`)."""
    opt = config.optimizer
    setup: dict[str, Any] = {
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "dtype": config.run.dtype,
        "optimizer": opt.name,  # the estimator reads moment bits and defaults from the same registry entry
        "layerwise": opt.layerwise,
        "activation_checkpointing": config.run.activation_checkpointing,
        "chunked_loss": config.run.loss_chunk_size > 0,
        "loss_chunk_size": config.run.loss_chunk_size or 1024,
        "accumulation_steps": config.data.grad_accum,
    }
    if opt.is_galore:
        setup.update(
            rank=opt.rank,
            projector=opt.projector,
            proj_bits=opt.resolved_proj_bits,
            weight_bits=opt.resolved_weight_bits,
            weight_group_size=opt.weight_group_size,
            adaptive_refresh=opt.resolved_adaptive_refresh,
        )
    return setup


def estimate_run(config: TrainConfig) -> Any:
    """The estimator's :class:`lowrank_train.memory.MemoryEstimate` for this run.

    Raises:
        ModuleNotFoundError: the estimator is not part of this install.
    """
    try:
        from lowrank_train.memory import estimate_memory
    except ImportError as error:
        raise ModuleNotFoundError(
            f"the memory estimator (lowrank_train.memory) cannot be imported: {error}"
        ) from error
    return estimate_memory(model_shape_source(config), training_setup(config))


def device_capacity(device: torch.device) -> int:
    """Bytes of memory on ``device``: the GPU's total memory, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_fit_problem(config: TrainConfig, device: torch.device) -> str | None:
    """A message when the estimated peak exceeds ``device``'s memory; ``None`` when it fits or cannot be estimated."""
    try:
        estimate = estimate_run(config)
    except (ModuleNotFoundError, ConfigError):
        return None  # no estimator, or shapes unknown before loading: nothing to check up front
    capacity = device_capacity(device)
    if estimate.peak <= capacity:
        return None
    return (
        f"the memory estimator predicts a peak of {format_bytes(estimate.peak)} for this run, more than the "
        f"{format_bytes(capacity)} of {device} (see `lowrank-train estimate` for the breakdown)"
    )
