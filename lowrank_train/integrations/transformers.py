"""Hugging Face ``Trainer`` glue: our optimizers (GaLore, Q-GaLore, layer-wise) built from ``TrainingArguments``.

Two ways in:

* :func:`create_lowrank_optimizer_and_scheduler` for ``Trainer(optimizers=(optimizer, scheduler))``.
* :class:`LowRankTrainer`, a ``Trainer`` that builds the optimizer itself (after FSDP wrapping, when
  accelerate shards the model) and reports the layer-wise engine's gradient norm. Without ``lowrank=`` it reads
  transformers' own GaLore settings (``TrainingArguments(optim="galore_adamw", optim_target_modules=...,
  optim_args="rank=..., update_proj_gap=..., scale=...")``, see :func:`lowrank_config_from_training_args`), so a
  transformers GaLore run switches by replacing ``Trainer`` with ``LowRankTrainer`` (issue 15 item 2).

:class:`LowRankOptimizerConfig` takes every GaLore group option of :mod:`lowrank_train.optim.options` by name and
checks them when it is built; :class:`LowRankTrainer` also checks ranks against the model's weights when built.

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

import difflib
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from lowrank_train.integrations.deepspeed import check_deepspeed_config
from lowrank_train.integrations.fsdp import FSDP2GaLore, is_sharded
from lowrank_train.nn.surgery import is_linear
from lowrank_train.optim import BASE_OPTIMIZERS, GaLore, lowrank_param_groups
from lowrank_train.optim.layerwise import LayerwiseOptimizer
from lowrank_train.optim.options import (
    FOREIGN_NAMES,
    GALORE_DEFAULTS,
    GROUP_OPTIONS,
    check_lowrank_group,
    check_option_names_for_any_base,
    validate_group_options,
)
from lowrank_train.optim.registry import OptimizerMethod, get_optimizer_method, optimizer_names

# Base optimizers that take Adam's betas and eps from TrainingArguments.
_ADAM_BASES = ("adamw", "adam", "adamw8bit", "paged_adamw8bit")
# Trainer.get_decay_parameter_names: no weight decay on biases and normalization weights.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


class _MethodDefault:
    """Marks an option left to the method's default (Q-GaLore: INT4 basis, adaptive refresh); resolved at init."""

    def __repr__(self) -> str:
        return "<method default>"


_METHOD_DEFAULT = _MethodDefault()
_CONFIG = "LowRankOptimizerConfig"


def _options_section() -> str:
    """The ``Attributes`` lines of the schema's options, generated so the docs cannot drift from the schema."""
    lines = []
    for option in GROUP_OPTIONS.values():
        if option.name != "rank":
            lines.append(f"        {option.name}: {option.doc} ({option.allowed}; default {option.default!r}).")
    return "\n".join(lines)


def _with_group_options(cls: type) -> type:
    """Gives ``cls`` one field per option of the group-option schema (:mod:`lowrank_train.optim.options`) that it
    does not declare itself, documents them, and makes it a frozen keyword-only dataclass whose constructor
    refuses an unknown name with a did-you-mean (and galore-torch's names with ours)."""
    annotations = cls.__dict__.get("__annotations__", {})
    for name in GROUP_OPTIONS:
        if name not in annotations:
            annotations[name] = "Any"
            setattr(cls, name, _METHOD_DEFAULT)
    cls.__annotations__ = annotations
    cls.__doc__ = cls.__doc__.replace("{options}", _options_section().lstrip())
    cls = dataclass(frozen=True, kw_only=True)(cls)
    init = cls.__init__
    known = tuple(f.name for f in fields(cls) if f.init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            raise ValueError(f"{_CONFIG} takes keyword arguments only, e.g. {_CONFIG}(rank=128), got {args!r}")
        for key in kwargs:
            if key in known:
                continue
            if key in FOREIGN_NAMES:
                raise ValueError(f"{_CONFIG}: unknown option {key!r}: {FOREIGN_NAMES[key]}")
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{_CONFIG}: unknown option {key!r}{hint}. Known: {sorted(known)}")
        init(self, **kwargs)

    cls.__init__ = __init__
    return cls


@_with_group_options
class LowRankOptimizerConfig:
    """Which low-rank optimizer a Trainer run uses; learning rate, decay and betas come from ``TrainingArguments``.

    Every GaLore group option of :mod:`lowrank_train.optim.options` is a keyword here, with the same name
    (``LowRankOptimizerConfig(rank=128, full_rank_fallback=True)``). Values are checked when the config is built:
    an unknown name, a value out of range or an unknown method or projector is a ``ValueError`` naming the option.
    Options left out take the method's default (the registry entry's ``proj_bits`` and ``adaptive_refresh``, e.g.
    "qgalore": ``proj_bits=4, adaptive_refresh=True``), then the schema's; the built config holds the values used.

    Attributes:
        method: a GaLore-family method of the optimizer registry (:mod:`lowrank_train.optim.registry`): "galore"
            (any base optimizer), "qgalore" (:class:`~lowrank_train.optim.QGaLoreAdamW8bit`: 8-bit AdamW, INT4
            basis, adaptive refresh; quantize the model first for INT8 weights), "galore8bit", "qgalore4bit", or
            one registered by the user.
        layerwise: step each parameter inside backward (:class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer`).
        rank: projection rank (default 128, as transformers' ``optim_args``).
        target_modules: "all-linear", a tuple of module names or dotted suffixes, or a regular expression
            (:func:`lowrank_train.nn.surgery.find_target_modules`).
        base: inner optimizer name (one of ``BASE_OPTIMIZERS``) for a method that takes any base ("galore");
            must stay None for the others, which build their own ("qgalore": 8-bit AdamW).
        group_options: further keys of the low-rank group for the base optimizer (e.g. ``{"lr": 1e-3}``); a GaLore
            option given here (the older spelling) is moved to its field.
        {options}
    """

    method: str = "galore"
    layerwise: bool = False
    rank: int = 128
    target_modules: str | tuple[str, ...] = "all-linear"
    base: str | None = None
    group_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        method = _lowrank_method(self.method)
        self._resolve_options(method)
        if isinstance(self.target_modules, list):  # accept lists (YAML, argparse) but store a hashable tuple
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.target_modules, (str, tuple)) or (
            isinstance(self.target_modules, tuple) and not all(isinstance(t, str) for t in self.target_modules)
        ):
            raise ValueError(
                f"{_CONFIG}: target_modules must be 'all-linear', a regular expression or a tuple of module names, "
                f"got {self.target_modules!r}"
            )
        if self.base is not None and not method.any_base:
            raise ValueError(
                f"method={self.method!r} ({method.description}) always builds its own inner optimizer "
                f"({method.base!r}), got base={self.base!r}; for another base use a method that takes any base "
                f"({_any_base_names()}) with proj_bits=4, adaptive_refresh=True"
            )
        if self.base is not None and (not isinstance(self.base, str) or self.base.lower() not in BASE_OPTIMIZERS):
            raise ValueError(f"{_CONFIG}: base must be None or one of {sorted(BASE_OPTIMIZERS)}, got {self.base!r}")

    def _resolve_options(self, method: OptimizerMethod) -> None:
        """Moves GaLore options out of ``group_options``, fills the method's defaults, validates every value."""
        if not isinstance(self.group_options, Mapping):
            raise ValueError(f"{_CONFIG}: group_options must be a mapping, got {type(self.group_options).__name__}")
        extra = dict(self.group_options)
        check_option_names_for_any_base(extra, where=f"{_CONFIG} group_options")
        reserved = sorted(
            key
            for key in extra
            if key in ("params", "param_names", "rank") or (key in GROUP_OPTIONS and self._given(key))
        )
        if reserved:
            raise ValueError(
                f"{_CONFIG}: group_options must not set {reserved}: they are fields of this config, pass them as "
                f"keywords ({_CONFIG}({reserved[0]}=...))"
            )
        defaults = {**GALORE_DEFAULTS, **_method_defaults(method)}
        options = {
            name: extra.pop(name) if name in extra else (getattr(self, name) if self._given(name) else defaults[name])
            for name in GROUP_OPTIONS
        }
        options = validate_group_options({**options, **extra}, where=_CONFIG)
        check_lowrank_group(options, where=_CONFIG)
        for name in GROUP_OPTIONS:
            object.__setattr__(self, name, options.pop(name))
        object.__setattr__(self, "group_options", options)

    def _given(self, name: str) -> bool:
        return name == "rank" or getattr(self, name) is not _METHOD_DEFAULT

    @property
    def options(self) -> dict[str, Any]:
        """The low-rank group's keys: every GaLore option (``rank``, ``update_gap``, ...) and ``group_options``."""
        return {**{name: getattr(self, name) for name in GROUP_OPTIONS}, **self.group_options}


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
    """The method's own group defaults (basis bits, adaptive refresh), over the schema's."""
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


def _check_projected_shapes(model: nn.Module, config: LowRankOptimizerConfig, from_training_args: bool) -> None:
    """The optimizer's shape checks (2-D weights, rank below min(m, n)), run on the model before training."""
    if config.projector == "identity" or config.full_rank_fallback:
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
        return lambda groups: method.build(groups, **_base_kwargs(method.base, args))
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
    groups = lowrank_param_groups(model, target_modules=config.target_modules, **config.options)
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


# transformers' GaLore values of TrainingArguments.optim -> (our registry method, base, layer-wise).
HF_GALORE_OPTIMIZERS: dict[str, tuple[str, str | None, bool]] = {
    "galore_adamw": ("galore", None, False),
    "galore_adamw_8bit": ("galore8bit", None, False),
    "galore_adafactor": ("galore", "adafactor", False),
    "galore_adamw_layerwise": ("galore", None, True),
    "galore_adamw_8bit_layerwise": ("galore8bit", None, True),
    "galore_adafactor_layerwise": ("galore", "adafactor", True),
}
# TrainingArguments.optim's defaults (transformers picks the fused kernel on torch >= 2.8): "not chosen".
_HF_DEFAULT_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
# transformers' optim_args keys for GaLore, as our option names ("proj_type" is handled on its own).
_HF_OPTIM_ARG_NAMES = {"rank": "rank", "update_proj_gap": "update_gap", "scale": "scale"}


def _optim_name(args: TrainingArguments) -> str:
    return str(getattr(args.optim, "value", args.optim))


def _parse_optim_arg(text: str) -> Any:
    """A string of ``optim_args`` as the Python value it spells (bool, None, int, float, else the string)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def _options_from_optim_args(optim_args: str | None) -> dict[str, Any]:
    """``TrainingArguments.optim_args`` (``"rank=64, update_proj_gap=100, scale=0.25, proj_type=std"``) as our
    option names and values: transformers' three GaLore keys renamed, any other option of ours by its own name.

    Unlike transformers, which drops keys it does not know, an unknown key or a value out of range is an error.
    """
    where = "TrainingArguments.optim_args"
    options: dict[str, Any] = {}
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{where}={optim_args!r}: expected comma-separated key=value pairs, got {item!r}")
        if key == "proj_type":
            if text != "std":
                raise ValueError(
                    f"{where}: proj_type={text!r} is not implemented here; only 'std' (project each weight on its "
                    "smaller side, transformers' default) is. Drop proj_type or set proj_type=std"
                )
            continue
        name = _HF_OPTIM_ARG_NAMES.get(key, key)
        if name not in GROUP_OPTIONS:
            known = sorted({*_HF_OPTIM_ARG_NAMES, "proj_type", *GROUP_OPTIONS})
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}. Known: {known}")
        if name in options:
            raise ValueError(f"{where}: {key} is given twice in {optim_args!r}")
        value = _parse_optim_arg(text)
        try:
            options[name] = validate_group_options({name: value}, where=where)[name]
        except ValueError:
            raise ValueError(
                f"{where}: {key} must be {GROUP_OPTIONS[name].allowed}, got {text!r} (in {optim_args!r})"
            ) from None
    return options


def hf_target_module_names(model: nn.Module, optim_target_modules: str | list[str] | None) -> tuple[str, ...]:
    """The linear layers that transformers' GaLore projects for ``TrainingArguments.optim_target_modules``.

    transformers' meaning (``Trainer``'s low-rank optimizer setup): "all-linear" (or "all_linear") is every linear
    layer, the output head included; another string is a regular expression matched against the whole qualified
    module name; a list selects a module when its name equals an entry, contains it, or fully matches it as a
    regular expression. A layer whose weight is tied to another parameter (reachable only under that name) is
    left out, as transformers leaves it out.

    Args:
        model: the model Trainer trains.
        optim_target_modules: ``TrainingArguments.optim_target_modules``.

    Returns:
        The qualified module names, in model order (our exact-name ``target_modules``).

    Raises:
        ValueError: when ``optim_target_modules`` is missing or of another type, or selects no linear layer.
    """
    _check_hf_target_modules(optim_target_modules)
    all_linear = isinstance(optim_target_modules, str) and optim_target_modules.replace("_", "-") == "all-linear"

    def matches(name: str) -> bool:
        if all_linear:
            return True
        if isinstance(optim_target_modules, str):
            return re.fullmatch(optim_target_modules, name) is not None
        return any(t == name or t in name or _fullmatch(t, name) for t in optim_target_modules)

    parameter_names = {name for name, _ in model.named_parameters()}
    names = tuple(
        name
        for name, module in model.named_modules()
        if is_linear(module) and f"{name}.weight" in parameter_names and matches(name)
    )
    if not names:
        raise ValueError(
            f"TrainingArguments.optim_target_modules={optim_target_modules!r} selects no linear layer of the model"
        )
    return names


def _check_hf_target_modules(optim_target_modules: Any) -> None:
    where = "TrainingArguments.optim_target_modules"
    if optim_target_modules is None:
        raise ValueError(
            f"{where} is required with a GaLore optim (as in transformers): e.g. 'all-linear' or ['attn', 'mlp']"
        )
    if not (
        isinstance(optim_target_modules, str)
        or (isinstance(optim_target_modules, (list, tuple)) and all(isinstance(t, str) for t in optim_target_modules))
    ):
        raise ValueError(f"{where} must be a string or a list of strings, got {optim_target_modules!r}")


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:  # a plain name with regex characters: only its substring test applies
        return False


def lowrank_config_from_training_args(
    args: TrainingArguments, model: nn.Module | None = None
) -> LowRankOptimizerConfig:
    """The config that ``TrainingArguments(optim="galore_*", optim_target_modules=..., optim_args=...)`` means.

    transformers' values map onto our registry: ``galore_adamw`` -> "galore", ``galore_adamw_8bit`` ->
    "galore8bit", ``galore_adafactor`` -> "galore" around Adafactor, and each ``*_layerwise`` form to the same with
    ``layerwise=True``. ``optim_args`` keys ``rank``, ``update_proj_gap`` (our ``update_gap``) and ``scale`` keep
    transformers' defaults (128, 200, 0.25); ``proj_type`` must be "std"; any other option of ours may be given by
    its name (``projector=rsvd``, ``proj_bits=4``).

    Args:
        args: the run's ``TrainingArguments``.
        model: the model, to resolve ``optim_target_modules`` with transformers' meaning
            (:func:`hf_target_module_names`); without it ``target_modules`` stays our default "all-linear".

    Raises:
        ValueError: for an ``optim`` other than transformers' GaLore values (apollo, lomo, plain AdamW...), an
            unknown or invalid ``optim_args`` key, or target modules that select nothing.
    """
    name = _optim_name(args)
    if name not in HF_GALORE_OPTIMIZERS:
        raise ValueError(
            f"TrainingArguments.optim={name!r} is not a GaLore optimizer this package implements; LowRankTrainer "
            f"reads {sorted(HF_GALORE_OPTIMIZERS)}, or pass lowrank=LowRankOptimizerConfig(...) (methods "
            f"{optimizer_names(lowrank=True)}). For {name!r} itself use transformers.Trainer"
        )
    method, base, layerwise = HF_GALORE_OPTIMIZERS[name]
    options = _options_from_optim_args(args.optim_args)
    if model is not None:
        options["target_modules"] = hf_target_module_names(model, args.optim_target_modules)
    else:
        _check_hf_target_modules(args.optim_target_modules)
    return LowRankOptimizerConfig(method=method, base=base, layerwise=layerwise, **options)


class LowRankTrainer(Trainer):
    """A ``Trainer`` that trains with our optimizers: ``LowRankTrainer(model, args, lowrank=config, ...)``.

    Two ways to choose the optimizer:

    * ``lowrank=LowRankOptimizerConfig(...)``; ``TrainingArguments.optim`` must then stay at its default.
    * no ``lowrank``, and transformers' own GaLore settings in ``TrainingArguments``: ``optim="galore_adamw"``
      (``galore_adamw_8bit``, ``galore_adafactor`` and their ``_layerwise`` forms), ``optim_target_modules`` and
      ``optim_args="rank=128, update_proj_gap=200, scale=0.25, proj_type=std"``, read with transformers' meaning
      (:func:`lowrank_config_from_training_args`), so switching from ``Trainer`` is a change of class name.
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
        ValueError: for the settings above, an ``optim`` value that is not one of transformers' GaLore values
            (apollo, lomo...) when ``lowrank`` is None, or a non-default ``optim`` next to ``lowrank``.
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
                "ignored: leave optim at its default, or drop lowrank= to use transformers' GaLore settings "
                f"({sorted(HF_GALORE_OPTIMIZERS)})"
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
