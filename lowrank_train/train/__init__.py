"""The training loop used by the recipes: configs, schedule, evaluation, atomic checkpoints, metrics.

``config`` (typed YAML sections) and ``config_schema`` (dataclasses from plain values), ``setup`` (device, data, model,
optimizer), ``run_dir`` (run folder, resume, RNG), ``checkpoint`` (atomic saves), ``loop`` (``train``), ``evaluation``
(``evaluate``, ``perplexity``), ``compress_run`` (``compress``: WeLore), ``estimate`` (memory fit), ``metrics`` /
``report`` (what a run records). No module shares a name with a function exported here.

Names are imported on first use, so lowrank_train.train.config alone does not pull in the loop's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lowrank_train._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (PEP 562) so that importing the package
# stays cheap (no torch / transformers until a name needs them): `lowrank-train --help` depends on it.
_EXPORTS = {
    "latest_checkpoint": "lowrank_train.train.checkpoint",
    "load_state": "lowrank_train.train.checkpoint",
    "read_meta": "lowrank_train.train.checkpoint",
    "save_checkpoint": "lowrank_train.train.checkpoint",
    "compress": "lowrank_train.train.compress_run",
    "CompressConfig": "lowrank_train.train.config",
    "ConfigError": "lowrank_train.train.config",
    "DataConfig": "lowrank_train.train.config",
    "FinetuneConfig": "lowrank_train.train.config",
    "ModelConfig": "lowrank_train.train.config",
    "OptimizerConfig": "lowrank_train.train.config",
    "RunConfig": "lowrank_train.train.config",
    "ScheduleConfig": "lowrank_train.train.config",
    "TrainConfig": "lowrank_train.train.config",
    "config_from_dict": "lowrank_train.train.config",
    "load_config": "lowrank_train.train.config",
    "parse_overrides": "lowrank_train.train.config",
    "evaluate": "lowrank_train.train.evaluation",
    "perplexity": "lowrank_train.train.evaluation",
    "train": "lowrank_train.train.loop",
    "read_metrics": "lowrank_train.train.metrics",
    "build_model": "lowrank_train.train.model",
    "llama_config": "lowrank_train.train.model",
    "MemoryTable": "lowrank_train.train.report",
    "memory_table": "lowrank_train.train.report",
    "optimizer_state_bytes": "lowrank_train.train.report",
    "ResumeError": "lowrank_train.train.run_dir",
    "RunLockedError": "lowrank_train.train.run_dir",
    "RunInterrupted": "lowrank_train.train.signals",
    "lr_factor": "lowrank_train.train.schedule",
}

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from lowrank_train.train.checkpoint import latest_checkpoint, load_state, read_meta, save_checkpoint  # noqa: F401
    from lowrank_train.train.compress_run import compress  # noqa: F401
    from lowrank_train.train.config import (
        CompressConfig,
        ConfigError,
        DataConfig,
        FinetuneConfig,
        ModelConfig,
        OptimizerConfig,
        RunConfig,
        ScheduleConfig,
        TrainConfig,
        config_from_dict,
        load_config,
        parse_overrides,
    )  # noqa: F401
    from lowrank_train.train.evaluation import evaluate, perplexity  # noqa: F401
    from lowrank_train.train.loop import train  # noqa: F401
    from lowrank_train.train.metrics import read_metrics  # noqa: F401
    from lowrank_train.train.model import build_model, llama_config  # noqa: F401
    from lowrank_train.train.report import MemoryTable, memory_table, optimizer_state_bytes  # noqa: F401
    from lowrank_train.train.run_dir import ResumeError, RunLockedError  # noqa: F401
    from lowrank_train.train.schedule import lr_factor  # noqa: F401
    from lowrank_train.train.signals import RunInterrupted  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "CompressConfig",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "MemoryTable",
    "ModelConfig",
    "OptimizerConfig",
    "ResumeError",
    "RunInterrupted",
    "RunLockedError",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "build_model",
    "compress",
    "config_from_dict",
    "evaluate",
    "latest_checkpoint",
    "llama_config",
    "load_config",
    "load_state",
    "lr_factor",
    "memory_table",
    "optimizer_state_bytes",
    "parse_overrides",
    "perplexity",
    "read_meta",
    "read_metrics",
    "save_checkpoint",
    "train",
]
