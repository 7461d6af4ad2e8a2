"""Hugging Face ``Trainer`` glue: our optimizers (GaLore, Q-GaLore, layer-wise) built from ``TrainingArguments``.

Two ways in:

* :func:`create_lowrank_optimizer_and_scheduler` for ``Trainer(optimizers=(optimizer, scheduler))``.
* :class:`LowRankTrainer`, a ``Trainer`` that builds the optimizer itself (after FSDP wrapping, when
  accelerate shards the model) and reports the layer-wise engine's gradient norm. Without ``lowrank=`` it reads
  transformers' own GaLore settings (``TrainingArguments(optim="galore_adamw", optim_target_modules=...,
  optim_args="rank=..., update_proj_gap=..., scale=...")``, see :func:`lowrank_config_from_training_args`), so a
  transformers GaLore run switches by replacing ``Trainer`` with ``LowRankTrainer`` (issue 15 item 2); so does an
  APOLLO run (``optim="apollo_adamw"`` / ``"apollo_adamw_layerwise"``, apollo-torch's ``optim_args``; issue 21).

:class:`LowRankOptimizerConfig` (defined, with the ``TrainingArguments`` migration, in
:mod:`lowrank_train.integrations.trainer_config` and re-exported here) takes every GaLore group option of
:mod:`lowrank_train.optim.options` by name and checks them when it is built; :class:`LowRankTrainer` also checks
ranks against the model's weights when built.

``Trainer`` calls ``optimizer.step()`` after every accumulated step. The layer-wise engine has already stepped
every parameter inside ``backward()`` by then, so layer-wise runs get :class:`TrainerLayerwiseOptimizer`, whose
``step()`` only checks that the step really ended. Its accumulation count and clipping come from
``gradient_accumulation_steps`` and ``max_grad_norm`` (clipped with the previous step's global norm, see
:mod:`lowrank_train.optim.layerwise`); Trainer's own clipping then finds no gradients and is a no-op.

Checkpoints: Trainer saves ``optimizer.state_dict()`` with ``torch.save`` and reloads it with
``torch.load(weights_only=True)``; every optimizer here keeps tensor-only state, so ``resume_from_checkpoint``
works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from lowrank_train.integrations.deepspeed import check_deepspeed_config
from lowrank_train.integrations.fsdp import FSDP2GaLore, is_sharded

# The config and the TrainingArguments migration live in trainer_config; re-exported so every import keeps working.
from lowrank_train.integrations.trainer_config import (
    _CONFIG,
    _HF_DEFAULT_OPTIMIZERS,
    APOLLO_TORCH_KEYS,
    HF_APOLLO_OPTIMIZERS,
    HF_GALORE_OPTIMIZERS,
    HF_LOWRANK_OPTIMIZERS,
    LowRankOptimizerConfig,
    _any_base_names,
    _optim_name,
    apollo_torch_param_groups,
    hf_target_module_names,
    lowrank_config_from_training_args,
)
from lowrank_train.optim import GaLore, lowrank_param_groups
from lowrank_train.optim.layerwise import LayerwiseOptimizer
from lowrank_train.optim.registry import get_optimizer_method, optimizer_names
from lowrank_train.projection import get_projector

__all__ = [
    "APOLLO_TORCH_KEYS",
    "HF_APOLLO_OPTIMIZERS",
    "HF_GALORE_OPTIMIZERS",
    "HF_LOWRANK_OPTIMIZERS",
    "LowRankOptimizerConfig",
    "LowRankTrainer",
    "TrainerLayerwiseOptimizer",
    "apollo_torch_param_groups",
    "create_lowrank_optimizer",
    "create_lowrank_optimizer_and_scheduler",
    "hf_target_module_names",
    "lowrank_config_from_training_args",
]

# Base optimizers that take Adam's betas and eps from TrainingArguments.
_ADAM_BASES = ("adamw", "adam", "adamw8bit", "paged_adamw8bit")
# Trainer.get_decay_parameter_names: no weight decay on biases and normalization weights.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def __getattr__(name: str) -> Any:
    # The methods a Trainer run takes are the registry's GaLore family; METHODS stays importable, always current.
    if name == "METHODS":
        return optimizer_names(lowrank=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TrainerLayerwiseOptimizer(LayerwiseOptimizer):
    """The layer-wise engine with a ``step()`` that Trainer may call: the update already ran inside backward.

    Raises:
        RuntimeError: from ``step()`` when backward passes of an unfinished accumulated step are pending, e.g.
            the shorter last accumulation of an epoch whose batch count is not a multiple of
            ``gradient_accumulation_steps``.
    """

    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise RuntimeError("a layer-wise optimizer cannot re-evaluate a closure: its steps run inside backward")
        if self.micro_step:
            raise RuntimeError(
                f"Trainer ended an optimizer step after {self.micro_step} of {self.accumulation_steps} backward "
                "passes; the layer-wise engine steps on the last one. Make the number of batches per epoch a "
                "multiple of gradient_accumulation_steps (e.g. dataloader_drop_last=True and a matching dataset "
                "size), or use gradient_accumulation_steps=1"
            )


def _check_projected_shapes(model: nn.Module, config: LowRankOptimizerConfig, from_training_args: bool) -> None:
    """The optimizer's shape checks (2-D weights, rank below min(m, n)), run on the model before training."""
    if not get_optimizer_method(config.method).lowrank:
        return
    if get_projector(config.projector).full_rank or config.full_rank_fallback:
        return
    where = "TrainingArguments.optim_args" if from_training_args else _CONFIG
    fallback = "full_rank_fallback=true in optim_args" if from_training_args else f"{_CONFIG}(full_rank_fallback=True)"
    group = lowrank_param_groups(model, target_modules=config.target_modules, **config.options)[0]
    for name, param in zip(group["param_names"], group["params"], strict=True):
        if param.dim() == 2 and config.rank >= min(param.shape):
            raise ValueError(
                f"{where}: rank {config.rank} is not below min(m, n) = {min(param.shape)} for {name} "
                f"{tuple(param.shape)}: a low-rank projection would save nothing. Lower the rank, or give such "
                f"weights the plain update with {fallback}"
            )


def _split_decay(groups: list[dict[str, Any]], model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Gives the low-rank group ``weight_decay`` and splits the plain group as ``Trainer`` does (no decay on
    biases and norms)."""
    decay_names = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))
    split: list[dict[str, Any]] = []
    for group in groups:
        if "rank" in group:
            split.append({**group, "weight_decay": weight_decay})
            continue
        for decayed in (True, False):
            chosen = [
                (n, p)
                for n, p in zip(group["param_names"], group["params"], strict=True)
                if (n in decay_names) == decayed
            ]
            if chosen:
                split.append(
                    {
                        **group,
                        "params": [p for _, p in chosen],
                        "param_names": [n for n, _ in chosen],
                        "weight_decay": weight_decay if decayed else 0.0,
                    }
                )
    return split


def _base_kwargs(base: str, args: TrainingArguments) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    if base in _ADAM_BASES:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if base == "adafactor":  # parameter-relative steps are meaningless on GaLore's zero shadow parameter
        kwargs.update(relative_step=False, scale_parameter=False, warmup_init=False)
    return kwargs


def _optimizer_factory(
    config: LowRankOptimizerConfig, args: TrainingArguments, sharded: bool
) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    method = get_optimizer_method(config.method)
    if not method.any_base:
        if sharded:
            raise ValueError(
                f"method={config.method!r} builds its own inner optimizer ({method.base!r}), which cannot step FSDP2 "
                f"(DTensor) parameters: use a method that takes any base ({_any_base_names()}) with base='adamw' "
                "with proj_bits=4, adaptive_refresh=True"
            )
        kwargs = _base_kwargs(method.base, args)
        if "scale" in method.method_options:  # a preset writes its own alpha over the groups' (APOLLO): pass ours
            kwargs["scale"] = config.scale
        return lambda groups: method.build(groups, **kwargs)
    # The plain GaLore wrapper around the chosen base (or its FSDP2 variant for sharded parameters).
    base = (config.base or method.base).lower()
    wrapper = FSDP2GaLore if sharded else GaLore
    return lambda groups: wrapper(groups, base=base, **_base_kwargs(base, args))


def create_lowrank_optimizer(
    model: nn.Module, args: TrainingArguments, config: LowRankOptimizerConfig
) -> torch.optim.Optimizer:
    """Our optimizer for ``model``, with ``TrainingArguments``' learning rate, weight decay, betas and eps.

    Linear weights selected by ``config.target_modules`` are projected; the rest (embeddings, norms, biases,
    the output head) get the plain base update, with no weight decay on biases and norms as in ``Trainer``.
    FSDP2-sharded (DTensor) parameters get :class:`~lowrank_train.integrations.fsdp.FSDP2GaLore`.

    Args:
        model: the model Trainer trains (already wrapped by FSDP2 when accelerate shards it).
        args: the run's ``TrainingArguments``.
        config: method, rank and projection settings.

    Returns:
        A :class:`~lowrank_train.optim.GaLore` (or subclass), or a :class:`TrainerLayerwiseOptimizer` when
        ``config.layerwise``.

    Raises:
        ValueError: when layer-wise stepping is asked for in a multi-process run, with FSDP2, or when no linear
            weight matches ``target_modules``.
    """
    if get_optimizer_method(config.method).lowrank:
        groups = lowrank_param_groups(model, target_modules=config.target_modules, **config.options)
    else:  # a method that builds its own roles from the names (SCALE: the head's momentum)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    groups = _split_decay(groups, model, args.weight_decay)
    sharded = any(is_sharded(p) for g in groups for p in g["params"])
    factory = _optimizer_factory(config, args, sharded)
    if not config.layerwise:
        return factory(groups)
    if sharded or args.world_size > 1:
        raise ValueError(
            "layer-wise stepping under Trainer runs in a single process (Trainer's DDP/FSDP wrappers reduce "
            "gradients after the engine has already used them). For several processes drop layerwise (DDP, or FSDP2 "
            f"with a method that takes any base: {_any_base_names()}), or use LayerwiseOptimizer directly under "
            "torchrun without a DDP wrapper"
        )
    return TrainerLayerwiseOptimizer(
        groups,
        factory,
        accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
        clip_mode="global-previous",
    )


def create_lowrank_optimizer_and_scheduler(
    model: nn.Module,
    args: TrainingArguments,
    config: LowRankOptimizerConfig,
    num_training_steps: int | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``, the scheduler from ``args.lr_scheduler_type``.

    Args:
        model: the model.
        args: the run's ``TrainingArguments`` (warmup, scheduler type and kwargs are read from it).
        config: see :class:`LowRankOptimizerConfig`.
        num_training_steps: total optimizer steps; defaults to ``args.max_steps`` when that is set. With
            neither, the scheduler is None and Trainer builds it once it knows the step count.

    Returns:
        The optimizer of :func:`create_lowrank_optimizer` and its scheduler (or None, see above).
    """
    optimizer = create_lowrank_optimizer(model, args, config)
    steps = num_training_steps if num_training_steps is not None else (args.max_steps if args.max_steps > 0 else None)
    if steps is None:
        return optimizer, None
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return optimizer, scheduler


class LowRankTrainer(Trainer):
    """A ``Trainer`` that trains with our optimizers: ``LowRankTrainer(model, args, lowrank=config, ...)``.

    Two ways to choose the optimizer:

    * ``lowrank=LowRankOptimizerConfig(...)``; ``TrainingArguments.optim`` must then stay at its default.
    * no ``lowrank``, and transformers' own GaLore settings in ``TrainingArguments``: ``optim="galore_adamw"``
      (``galore_adamw_8bit``, ``galore_adafactor`` and their ``_layerwise`` forms), ``optim_target_modules`` and
      ``optim_args="rank=128, update_proj_gap=200, scale=0.25, proj_type=std"``, read with transformers' meaning
      (:func:`lowrank_config_from_training_args`), so switching from ``Trainer`` is a change of class name. The
      same for APOLLO: ``optim="apollo_adamw"`` (or ``"apollo_adamw_layerwise"``) with ``optim_args="rank=256,
      proj=random, scale_type=channel, update_proj_gap=200, scale=1"`` (transformers' keys and defaults).
      Differences from transformers' GaLore: ``adam_beta1``/``adam_beta2``/``adam_epsilon`` and ``weight_decay``
      (not on biases and norms) are honoured, where transformers' GaLore path drops them; layer-wise runs accept
      ``gradient_accumulation_steps``; checkpoints resume under ``torch.load(weights_only=True)``; an unknown
      ``optim_args`` key is an error, not ignored.

    Settings are checked when the trainer is built, before training: unknown options, values out of range,
    target modules that select nothing, and a rank not below a projected weight's smaller side (unless
    ``full_rank_fallback``).

    It builds the optimizer in :meth:`create_optimizer` (when Trainer asks, i.e. after accelerate's FSDP2
    wrapping), and logs the layer-wise engine's global gradient norm instead of Trainer's (which sees no
    gradients in layer-wise mode). Everything else is ``Trainer``.

    Args:
        *args: ``Trainer`` arguments.
        lowrank: the optimizer settings; None to read them from ``TrainingArguments.optim`` (see above).
        **kwargs: ``Trainer`` keyword arguments (not ``optimizers`` or ``optimizer_cls_and_kwargs``).

    Raises:
        ValueError: for the settings above, an ``optim`` value that is not one of transformers' GaLore or
            APOLLO values (lomo...) when ``lowrank`` is None, or a non-default ``optim`` next to ``lowrank``.
    """

    def __init__(self, *args: Any, lowrank: LowRankOptimizerConfig | None = None, **kwargs: Any):
        if kwargs.get("optimizers", (None, None))[0] is not None or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError("LowRankTrainer builds its own optimizer from `lowrank`: do not pass `optimizers`")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        from_training_args = lowrank is None
        if from_training_args:
            if training_args is None:
                raise ValueError(
                    "LowRankTrainer needs lowrank=LowRankOptimizerConfig(...) or "
                    "args=TrainingArguments(optim='galore_adamw', optim_target_modules=..., optim_args=...)"
                )
            lowrank = lowrank_config_from_training_args(training_args)  # every check that needs no model
        elif not isinstance(lowrank, LowRankOptimizerConfig):
            raise ValueError(f"lowrank must be a LowRankOptimizerConfig, got {type(lowrank).__name__}")
        elif training_args is not None and _optim_name(training_args) not in _HF_DEFAULT_OPTIMIZERS:
            raise ValueError(
                f"lowrank= chooses the optimizer, so TrainingArguments.optim={_optim_name(training_args)!r} would be "
                "ignored: leave optim at its default, or drop lowrank= to use transformers' GaLore / APOLLO settings "
                f"({sorted(HF_LOWRANK_OPTIMIZERS)})"
            )
        self.lowrank = lowrank
        super().__init__(*args, **kwargs)
        if from_training_args:  # optim_target_modules, resolved on the model as transformers does
            self.lowrank = lowrank_config_from_training_args(self.args, self.model)
        _check_projected_shapes(self.model, self.lowrank, from_training_args)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self._check_engine()
            self.optimizer = create_lowrank_optimizer(self.model if model is None else model, self.args, self.lowrank)
        return self.optimizer

    def _check_engine(self) -> None:
        """Refuses the accelerate engines that flatten parameters before GaLore could see their shapes."""
        if self.is_deepspeed_enabled:
            check_deepspeed_config(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp_enabled and plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "FSDP1 flattens parameters into 1-D FlatParameters, so GaLore cannot project them: set "
                "fsdp_config={'fsdp_version': 2} (per-parameter DTensor sharding, handled by FSDP2GaLore)"
            )

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        engine = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the optimizer
        if isinstance(engine, LayerwiseOptimizer):
            norm = engine.last_grad_norm
            return None if norm is None else float(norm)
        return super()._get_grad_norm(model, grad_norm=grad_norm)
