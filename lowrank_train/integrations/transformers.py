"""Hugging Face ``Trainer`` glue: our optimizers (GaLore, Q-GaLore, layer-wise) built from ``TrainingArguments``.

Two ways in:

* :func:`create_lowrank_optimizer_and_scheduler` for ``Trainer(optimizers=(optimizer, scheduler))``.
* :class:`LowRankTrainer`, a ``Trainer`` that builds the optimizer itself (after FSDP wrapping, when
  accelerate shards the model) and reports the layer-wise engine's gradient norm.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from lowrank_train.integrations.deepspeed import check_deepspeed_config
from lowrank_train.integrations.fsdp import FSDP2GaLore, is_sharded
from lowrank_train.optim import BASE_OPTIMIZERS, GaLore, lowrank_param_groups
from lowrank_train.optim.layerwise import LayerwiseOptimizer
from lowrank_train.optim.registry import OptimizerMethod, get_optimizer_method, optimizer_names

# Base optimizers that take Adam's betas and eps from TrainingArguments.
_ADAM_BASES = ("adamw", "adam", "adamw8bit", "paged_adamw8bit")
# Trainer.get_decay_parameter_names: no weight decay on biases and normalization weights.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


@dataclass(frozen=True)
class LowRankOptimizerConfig:
    """Which low-rank optimizer a Trainer run uses; learning rate, decay and betas come from ``TrainingArguments``.

    Attributes:
        method: a GaLore-family method of the optimizer registry (:mod:`lowrank_train.optim.registry`): "galore"
            (any base optimizer), "qgalore" (:class:`~lowrank_train.optim.QGaLoreAdamW8bit`: 8-bit AdamW, INT4
            basis, adaptive refresh; quantize the model first for INT8 weights), "galore8bit", "qgalore4bit", or
            one registered by the user.
        layerwise: step each parameter inside backward (:class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer`).
        rank: projection rank.
        update_gap: steps between basis refreshes.
        scale: GaLore's alpha.
        projector: "svd", "rsvd", "random" (see :mod:`lowrank_train.projection`).
        target_modules: "all-linear", a tuple of module-name suffixes, or a regular expression.
        base: inner optimizer name (one of ``BASE_OPTIMIZERS``) for a method that takes any base ("galore");
            must stay None for the others, which build their own ("qgalore": 8-bit AdamW).
        group_options: more low-rank group keys (``proj_bits``, ``adaptive_refresh``, ``full_rank_fallback``...).
    """

    method: str = "galore"
    layerwise: bool = False
    rank: int = 128
    update_gap: int = 200
    scale: float = 0.25
    projector: str = "svd"
    target_modules: str | tuple[str, ...] = "all-linear"
    base: str | None = None
    group_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method = _lowrank_method(self.method)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.update_gap, bool) or not isinstance(self.update_gap, int) or self.update_gap < 1:
            raise ValueError(f"update_gap must be an integer >= 1, got {self.update_gap!r}")
        if not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"scale must be a number > 0, got {self.scale!r}")
        if isinstance(self.target_modules, list):  # accept lists (YAML, argparse) but store a hashable tuple
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.target_modules, (str, tuple)) or (
            isinstance(self.target_modules, tuple) and not all(isinstance(t, str) for t in self.target_modules)
        ):
            raise ValueError(
                f"target_modules must be 'all-linear', a regular expression or a tuple of module names, "
                f"got {self.target_modules!r}"
            )
        if self.base is not None and not method.any_base:
            raise ValueError(
                f"method={self.method!r} ({method.description}) always builds its own inner optimizer "
                f"({method.base!r}), got base={self.base!r}; for another base use a method that takes any base "
                f"({_any_base_names()}) with group_options={{'proj_bits': 4, 'adaptive_refresh': True}}"
            )
        if self.base is not None and self.base.lower() not in BASE_OPTIMIZERS:
            raise ValueError(f"base must be None or one of {sorted(BASE_OPTIMIZERS)}, got {self.base!r}")
        reserved = {"params", "param_names", "rank", "update_gap", "scale", "projector"} & set(self.group_options)
        if reserved:
            raise ValueError(f"group_options must not set {sorted(reserved)}: they are fields of this config")


def __getattr__(name: str) -> Any:
    # The methods a Trainer run takes are the registry's GaLore family; METHODS stays importable, always current.
    if name == "METHODS":
        return optimizer_names(lowrank=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lowrank_method(name: str) -> OptimizerMethod:
    """The registry entry of a GaLore-family method (Trainer runs always project gradients)."""
    names = optimizer_names(lowrank=True)
    try:
        method = get_optimizer_method(name)
    except ValueError as error:
        raise ValueError(f"method must be one of {names}, got {name!r}: {error}") from None
    if not method.lowrank:
        raise ValueError(f"method must be one of {names} (the GaLore family), got {name!r}, which does not project")
    return method


def _any_base_names() -> str:
    return ", ".join(repr(n) for n in optimizer_names(lowrank=True) if get_optimizer_method(n).any_base)


def _method_defaults(method: OptimizerMethod) -> dict[str, Any]:
    """The method's own group defaults (basis bits, adaptive refresh) for a GaLore built around another base."""
    return {key: getattr(method, key) for key in ("proj_bits", "adaptive_refresh") if getattr(method, key)}


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
                "and group_options={'proj_bits': 4, 'adaptive_refresh': True}"
            )
        return lambda groups: method.build(groups, **_base_kwargs(method.base, args))
    # The plain GaLore wrapper around the chosen base (or its FSDP2 variant for sharded parameters).
    base = (config.base or method.base).lower()
    wrapper = FSDP2GaLore if sharded else GaLore
    return lambda groups: wrapper(groups, base=base, **_method_defaults(method), **_base_kwargs(base, args))


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
    groups = lowrank_param_groups(
        model,
        rank=config.rank,
        update_gap=config.update_gap,
        scale=config.scale,
        projector=config.projector,
        target_modules=config.target_modules,
        **config.group_options,
    )
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

    It builds the optimizer in :meth:`create_optimizer` (when Trainer asks, i.e. after accelerate's FSDP2
    wrapping), and logs the layer-wise engine's global gradient norm instead of Trainer's (which sees no
    gradients in layer-wise mode). Everything else is ``Trainer``.

    Args:
        *args: ``Trainer`` arguments.
        lowrank: the optimizer settings.
        **kwargs: ``Trainer`` keyword arguments (not ``optimizers`` or ``optimizer_cls_and_kwargs``).
    """

    def __init__(self, *args: Any, lowrank: LowRankOptimizerConfig, **kwargs: Any):
        if kwargs.get("optimizers", (None, None))[0] is not None or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError("LowRankTrainer builds its own optimizer from `lowrank`: do not pass `optimizers`")
        if not isinstance(lowrank, LowRankOptimizerConfig):
            raise ValueError(f"lowrank must be a LowRankOptimizerConfig, got {type(lowrank).__name__}")
        self.lowrank = lowrank
        super().__init__(*args, **kwargs)

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
