"""What a run is built from: device and dtype, tokenizer and packed data, the prepared model, param groups and the
optimizer (from the optimizer registry, :mod:`lowrank_train.optim.registry`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lowrank_train.train.config import ConfigError, OptimizerConfig, TrainConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but torch sees no CUDA device; use run.device=cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` -> the torch dtype."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_run_tokenizer(name: str, model_tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``data.tokenizer``; ``model`` means the one that came with the pretrained model."""
    if name == "model":
        if model_tokenizer is None:
            raise ConfigError(
                "data.tokenizer is 'model' but the model came without a tokenizer (built from shapes, or its folder "
                "has none): name one, e.g. data.tokenizer=gpt2-offline"
            )
        return model_tokenizer
    from lowrank_train.data import load_tokenizer

    return load_tokenizer(name)


def load_run_data(config: TrainConfig, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Any:
    """Tokenize, pack and cache ``data.corpus``; check that its token ids fit the model's embedding.

    Returns:
        a :class:`lowrank_train.data.PackedCorpus` (``train`` and ``heldout`` blocks of ``data.seq_len``).
    """
    from lowrank_train.data import build_packed_corpus, check_vocab_fits

    data = config.data
    packed = build_packed_corpus(data.corpus, tokenizer, data.seq_len, **_corpus_options(config))
    check_vocab_fits(packed.max_token_id, vocab_size, tokenizer_name=data.tokenizer)
    if packed.train.shape[0] < data.batch_size:
        raise ConfigError(
            f"data.batch_size ({data.batch_size}) exceeds the {packed.train.shape[0]} training sequences of "
            f"{data.seq_len} tokens in {data.corpus!r}: lower data.batch_size or data.seq_len"
        )
    return packed


def _corpus_options(config: TrainConfig) -> dict[str, Any]:
    """The ``data.*`` keywords that choose, split and cache the corpus, as both data entry points take them."""
    data = config.data
    return {
        "heldout_fraction": data.heldout_fraction,
        "hub_config": data.hub_config,
        "split": data.split,
        "text_field": data.text_field,
        "max_documents": data.max_documents,
        "cache_dir": data.cache_dir,
    }


def open_run_data(
    config: TrainConfig, tokenizer: PreTrainedTokenizerBase, vocab_size: int, *, world_size: int = 1
) -> Any:
    """The run's training data through :func:`lowrank_train.data.open_training_data`: a memory-mapped token file
    for local corpora, a packed stream for hub ones (never the whole corpus in memory).

    Under ``world_size`` data-parallel ranks the batches are global ones of ``world_size * data.batch_size`` rows
    (each rank keeps its share: :class:`lowrank_train.data.sharding.RankShare`).

    Returns:
        a :class:`lowrank_train.data.TrainingData` (resumable ``train_batches()``, ``heldout``, ``fingerprint``).

    Raises:
        ConfigError: a corpus name that is neither an offline corpus, a local path nor a reachable hub dataset
            (names data.corpus and the offline choices), or a ``data.*`` value the data layer refuses.
    """
    from lowrank_train.data import check_vocab_fits, offline_corpus_names, open_training_data
    from lowrank_train.data.corpora import is_hub_source

    data = config.data
    switches = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    offline = any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in switches)
    if offline and isinstance(data.corpus, str) and is_hub_source(data.corpus):
        raise ConfigError(
            f"data.corpus={data.corpus!r} is neither an offline corpus nor a local file or folder, and the hub is "
            f"switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): use one of {', '.join(offline_corpus_names())} or "
            "a local .txt/.jsonl file"
        )
    try:
        training_data = open_training_data(
            data.corpus,
            tokenizer,
            seq_len=data.seq_len,
            batch_size=data.batch_size * world_size,
            seed=config.run.seed,
            streaming=data.streaming,
            shuffle_buffer=data.shuffle_buffer,
            heldout_documents=data.heldout_documents,
            **_corpus_options(config),
        )
    except ConnectionError as error:  # offline, an unknown name is tried on the hub: say what works offline
        raise ConfigError(f"data.corpus={data.corpus!r}: {error}") from None
    except ValueError as error:
        raise ConfigError(f"data ({data.corpus!r}): {error}") from error
    check_vocab_fits(training_data.max_token_id, vocab_size, tokenizer_name=data.tokenizer)
    return training_data


def prepare_model(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """INT8 weights (``optimizer.weight_bits``), activation checkpointing, then move to ``device``."""
    bits = config.optimizer.resolved_weight_bits
    if bits is not None:
        from lowrank_train.nn import QuantLinear, quantize_model

        if not any(isinstance(m, QuantLinear) for m in model.modules()):  # built quantized from shapes already
            quantize_model(model, bits=bits, group_size=config.optimizer.weight_group_size)
    if config.run.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError(f"run.activation_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.train()
    return model


def pretrain_param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict[str, Any]]:
    """GaLore-style groups (projected linear weights + the rest) for the GaLore family, else one named group."""
    if config.is_galore:
        from lowrank_train.optim import lowrank_param_groups

        return lowrank_param_groups(
            model,
            rank=config.rank,
            update_gap=config.update_gap,
            scale=config.scale,
            projector=config.projector,
            target_modules=list(config.target_modules)
            if isinstance(config.target_modules, tuple)
            else config.target_modules,
            proj_bits=config.resolved_proj_bits,
            adaptive_refresh=config.resolved_adaptive_refresh,
            **({} if config.proj_dtype is None else {"proj_dtype": config.proj_dtype}),
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]


def finetune_param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The groups of a WeLore fine-tuning run: what ``finetune.trainable`` marks trainable, GaLore where asked."""
    from lowrank_train.welore import mark_trainable

    opt = config.optimizer
    options = {"update_gap": opt.update_gap, "scale": opt.scale, "projector": opt.projector}
    if opt.resolved_proj_bits is not None:
        options["proj_bits"] = opt.resolved_proj_bits
    if opt.proj_dtype is not None:
        options["proj_dtype"] = opt.proj_dtype
    options["adaptive_refresh"] = opt.resolved_adaptive_refresh
    try:
        return mark_trainable(model, config.finetune.trainable, galore_rank=opt.rank, galore_options=options)
    except ValueError as error:
        raise ConfigError(
            f"finetune: {error}. model.pretrained must be a folder written by `lowrank-train compress`"
        ) from error


def _hyperparameters(config: OptimizerConfig) -> dict[str, Any]:
    return {"lr": config.lr, "weight_decay": config.weight_decay, "betas": config.betas, "eps": config.eps}


def optimizer_factory(
    config: OptimizerConfig, *, build: Callable[..., torch.optim.Optimizer] | None = None
) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """A function from param groups to the optimizer named by ``config.name`` (its registry entry's builder, or
    ``build`` with the same hyperparameters: the FSDP2 variant, :mod:`lowrank_train.train.sharded`)."""
    kwargs = _hyperparameters(config)
    # Only when asked: a registered builder's contract is lr / weight_decay / betas / eps, and the GaLore family's
    # default is "raise" already. Layer-wise, the engine around the inner optimizers applies the policy.
    if config.nonfinite != "raise" and config.is_galore and not config.layerwise:
        kwargs["nonfinite"] = config.nonfinite
    builder = build or config.method.build
    return lambda groups: builder(groups, **kwargs)


def dense_optimizer_factory(config: OptimizerConfig) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None:
    """The optimizer of the groups without ``rank`` that ``optimizer.dense_state_bits`` picks (its entry in
    :mod:`lowrank_train.optim.dense_states`); ``None`` when unset (the method's own inner optimizer steps them)."""
    if config.dense_state_bits is None:
        return None
    from lowrank_train.optim.dense_states import dense_states

    entry = dense_states(config.dense_state_bits)
    kwargs = _hyperparameters(config)
    return lambda groups: entry.build(groups, **kwargs)


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over ``groups``; with ``optimizer.layerwise`` a :class:`LayerwiseOptimizer` around it.

    With ``optimizer.dense_state_bits`` the groups without ``rank`` get their own optimizer: per parameter inside
    the layer-wise engine, else a :class:`~lowrank_train.optim.dense_states.DenseSplitOptimizer` of both parts.
    """
    factory = optimizer_factory(config.optimizer)
    dense = dense_optimizer_factory(config.optimizer)
    if not config.optimizer.layerwise:
        if dense is None:
            return factory(groups)
        from lowrank_train.optim.dense_states import DenseSplitOptimizer, is_dense_group

        projected = [g for g in groups if not is_dense_group(g)]
        plain = [g for g in groups if is_dense_group(g)]
        if not plain:
            return factory(groups)
        return DenseSplitOptimizer(
            factory(projected) if projected else None, dense(plain), nonfinite=config.optimizer.nonfinite
        )
    from lowrank_train.optim.dense_states import dense_split_factory
    from lowrank_train.optim.layerwise import LayerwiseOptimizer

    if dense is not None:
        factory = dense_split_factory(factory, dense)

    max_norm = config.optimizer.max_grad_norm or None
    return LayerwiseOptimizer(
        groups,
        factory,
        accumulation_steps=config.data.grad_accum,
        max_grad_norm=max_norm,
        nonfinite=config.optimizer.nonfinite,
    )
