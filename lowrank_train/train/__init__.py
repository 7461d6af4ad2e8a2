"""The training loop used by the recipes: configs, schedule, evaluation, atomic checkpoints, metrics.

``config`` (typed YAML sections) and ``config_schema`` (dataclasses from plain values), ``setup`` (device, data, model,
optimizer), ``run_dir`` (run folder, resume, RNG), ``checkpoint`` (atomic saves), ``loop`` (``train``), ``evaluate``,
``compress`` (WeLore), ``estimate`` (memory fit), ``metrics`` / ``report`` (what a run records).
"""

from lowrank_train.train.checkpoint import latest_checkpoint, load_state, read_meta, save_checkpoint
from lowrank_train.train.compress import compress
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
)
from lowrank_train.train.evaluate import evaluate, perplexity
from lowrank_train.train.loop import train
from lowrank_train.train.metrics import read_metrics
from lowrank_train.train.model import build_model, llama_config
from lowrank_train.train.report import MemoryTable, memory_table, optimizer_state_bytes
from lowrank_train.train.run_dir import ResumeError
from lowrank_train.train.schedule import lr_factor

__all__ = [
    "CompressConfig",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "MemoryTable",
    "ModelConfig",
    "OptimizerConfig",
    "ResumeError",
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
