"""The low-rank optimizer settings of a ``Trainer`` run, and their migration from ``TrainingArguments.optim``.

* :class:`LowRankOptimizerConfig`: which method (a GaLore-family entry of :mod:`lowrank_train.optim.registry`),
  its base optimizer, target modules and every GaLore group option of :mod:`lowrank_train.optim.options`, checked
  when the config is built.
* :func:`lowrank_config_from_training_args`: the config that transformers' own GaLore and APOLLO settings
  (``optim="galore_*"`` / ``"apollo_adamw*"``, ``optim_target_modules``, ``optim_args``) mean, with transformers'
  meaning of the target modules (:func:`hf_target_module_names`).
* :func:`apollo_torch_param_groups`: apollo-torch's ``APOLLOAdamW`` param groups as ours (:data:`APOLLO_TORCH_KEYS`).

Nothing here imports transformers: :mod:`lowrank_train.integrations.transformers` builds the optimizer and the
``Trainer`` from these settings and re-exports every name.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from torch import nn

from lowrank_train.nn.surgery import is_linear
from lowrank_train.optim import BASE_OPTIMIZERS
from lowrank_train.optim.options import (
    FOREIGN_NAMES,
    GALORE_DEFAULTS,
    GROUP_OPTIONS,
    check_lowrank_group,
    check_option_names_for_any_base,
    validate_group_options,
)
from lowrank_train.optim.registry import OptimizerMethod, get_optimizer_method, optimizer_names

if TYPE_CHECKING:
    from transformers import TrainingArguments


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
        method = _trainer_method(self.method)
        if not method.lowrank:
            given = sorted(name for name in GROUP_OPTIONS if name != "rank" and self._given(name))
            if given:
                raise ValueError(
                    f"{_CONFIG}: method={self.method!r} ({method.description}) does not project gradients, so the "
                    f"GaLore options {given} do not apply to it"
                )
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
        for name in _FIXED_BY_METHOD:  # a preset writes these over a group's value: a different one would be lost
            fixed = method.method_options.get(name)
            if fixed is not None and self._given(name) and getattr(self, name) != fixed:
                raise ValueError(
                    f"{_CONFIG}: method={self.method!r} fixes {name}={fixed!r}, got {name}={getattr(self, name)!r}; "
                    f"for another {name} use method='galore' with update={method.method_options.get('update')!r}"
                )
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


# Options an update-rule preset (APOLLO, Fira) writes over a group's own value (lowrank_train.optim.presets).
_FIXED_BY_METHOD = ("update", "projector")


def _trainer_methods() -> tuple[str, ...]:
    # The GaLore family, and the methods with a state layout of their own (SCALE); not a bare base optimizer.
    return tuple(n for n in optimizer_names() if _is_trainer_method(get_optimizer_method(n)))


def _is_trainer_method(method: OptimizerMethod) -> bool:
    return method.lowrank or method.state_bytes is not None


def _trainer_method(name: str) -> OptimizerMethod:
    """The registry entry of a GaLore-family method or of a structured one that does not project (SCALE)."""
    names = _trainer_methods()
    try:
        method = get_optimizer_method(name)
    except ValueError as error:
        raise ValueError(f"method must be one of {names}, got {name!r}: {error}") from None
    if not _is_trainer_method(method):
        raise ValueError(
            f"method must be one of {names} (the GaLore family and SCALE), got {name!r}, which is its base optimizer "
            "on every parameter: use transformers.Trainer for it"
        )
    return method


def _any_base_names() -> str:
    return ", ".join(repr(n) for n in optimizer_names(lowrank=True) if get_optimizer_method(n).any_base)


def _method_defaults(method: OptimizerMethod) -> dict[str, Any]:
    """The method's own group defaults (basis bits, adaptive refresh; APOLLO's rule, projector, scale...), over the
    schema's."""
    defaults = {key: getattr(method, key) for key in ("proj_bits", "adaptive_refresh") if getattr(method, key)}
    defaults.update({k: v for k, v in method.method_options.items() if k in GROUP_OPTIONS and k != "rank"})
    return defaults


# transformers' GaLore values of TrainingArguments.optim -> (our registry method, base, layer-wise).
HF_GALORE_OPTIMIZERS: dict[str, tuple[str, str | None, bool]] = {
    "galore_adamw": ("galore", None, False),
    "galore_adamw_8bit": ("galore8bit", None, False),
    "galore_adafactor": ("galore", "adafactor", False),
    "galore_adamw_layerwise": ("galore", None, True),
    "galore_adamw_8bit_layerwise": ("galore8bit", None, True),
    "galore_adafactor_layerwise": ("galore", "adafactor", True),
}
# transformers' APOLLO values (apollo-torch's APOLLOAdamW) -> (our registry method, base, layer-wise).
HF_APOLLO_OPTIMIZERS: dict[str, tuple[str, str | None, bool]] = {
    "apollo_adamw": ("apollo", None, False),
    "apollo_adamw_layerwise": ("apollo", None, True),
}
HF_LOWRANK_OPTIMIZERS = {**HF_GALORE_OPTIMIZERS, **HF_APOLLO_OPTIMIZERS}
# TrainingArguments.optim's defaults (transformers picks the fused kernel on torch >= 2.8): "not chosen".
_HF_DEFAULT_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def _std_only(value: Any, where: str) -> None:
    if value != "std":
        raise ValueError(
            f"{where}: proj_type={value!r} is not implemented here; only 'std' (project each weight on its smaller "
            "side, the default of galore-torch, apollo-torch and transformers) is. Drop proj_type or set it to std"
        )


def _same(value: Any, where: str) -> Any:
    del where
    return value


# apollo-torch's `proj` values that the 'apollo' rule implements, and our projector for each.
_APOLLO_TORCH_PROJECTORS = {"random": "random"}


def _apollo_projector(value: Any, where: str) -> str:
    if value not in _APOLLO_TORCH_PROJECTORS:
        raise ValueError(
            f"{where}: proj={value!r}: only apollo-torch's 'random' projection (APOLLO's) is implemented with the "
            "'apollo' rule here; for an SVD basis with a scaled full-rank update use update='fira' (Fira)"
        )
    return _APOLLO_TORCH_PROJECTORS[value]


def _apollo_scale(value: Any, where: str) -> Any:
    # apollo-torch multiplies its update by sqrt(scale) (scale 128 for APOLLO-Mini); our scale is that factor.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}: scale must be a number > 0, got {value!r}")
    return math.sqrt(value)


# A foreign key -> (our option, converter(value, where) -> our value); None: checked, then dropped.
ForeignKeys = Mapping[str, tuple[str | None, Callable[[Any, str], Any]]]
GALORE_TORCH_KEYS: ForeignKeys = {
    "rank": ("rank", _same),
    "update_proj_gap": ("update_gap", _same),
    "scale": ("scale", _same),
    "proj_type": (None, _std_only),
}
"""galore-torch's group keys (and transformers' ``optim_args`` for ``optim="galore_*"``), as ours."""
APOLLO_TORCH_KEYS: ForeignKeys = {
    "rank": ("rank", _same),
    "proj": ("projector", _apollo_projector),
    "scale_type": ("scale_type", _same),
    "update_proj_gap": ("update_gap", _same),
    "scale": ("scale", _apollo_scale),
    "proj_type": (None, _std_only),
}
"""apollo-torch's group keys (and transformers' ``optim_args`` for ``optim="apollo_adamw"``), as ours: ``proj`` ->
``projector``, ``update_proj_gap`` -> ``update_gap``, ``scale`` -> ``sqrt(scale)`` (apollo-torch multiplies its
update by the square root), ``proj_type`` must be "std"; the group's rule becomes ``update="apollo"``."""


def apollo_torch_param_groups(param_groups: Any, *, disable_nl: bool = False) -> list[dict[str, Any]]:
    """apollo-torch ``APOLLOAdamW`` param groups as ours, for ``GaLore(groups, base="adamw", ...)``.

    Groups with ``rank`` get :data:`APOLLO_TORCH_KEYS` mapped and ``update="apollo"``; apollo-torch's defaults
    (``proj`` "random", ``scale_type`` "channel", ``update_proj_gap`` 200, ``scale`` 1) are ours too. Other keys
    (``lr``, ``betas``, ``weight_decay``...) and groups without ``rank`` are kept.

    Args:
        param_groups: apollo-torch groups (dicts; ``rank`` marks a low-rank one).
        disable_nl: apollo-torch's ``APOLLOAdamW(disable_nl=True)``: no norm-growth limiter
            (``norm_growth_limit=inf``); its limiter (gamma 1.01) is ours by default.

    Returns:
        New groups, checked by our schema (a ``ValueError`` names the group and key).

    Example:
        >>> opt = GaLore(apollo_torch_param_groups(groups), base="adamw", lr=1e-2)
    """
    migrated = []
    for index, group in enumerate(param_groups):
        where = f"apollo-torch param group {index}"
        if not isinstance(group, Mapping):
            raise ValueError(f"{where}: expected a dict, got {type(group).__name__}")
        if "rank" not in group:
            migrated.append(dict(group))
            continue
        ours = {k: v for k, v in group.items() if k not in APOLLO_TORCH_KEYS}
        for key, (name, convert) in APOLLO_TORCH_KEYS.items():
            if key in group:
                value = convert(group[key], f"{where}: {key}")
                if name is not None:
                    ours[name] = value
        ours.setdefault("projector", "random")
        ours["update"] = "apollo"
        if disable_nl:
            ours["norm_growth_limit"] = math.inf
        migrated.append(validate_group_options(ours, where=where))
    return migrated


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


def _options_from_optim_args(optim_args: str | None, foreign: ForeignKeys = GALORE_TORCH_KEYS) -> dict[str, Any]:
    """``TrainingArguments.optim_args`` (``"rank=64, update_proj_gap=100, scale=0.25, proj_type=std"``) as our
    option names and values: transformers' keys of the method (``foreign``) converted, any other option of ours by
    its own name.

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
        name, convert = foreign.get(key, (key, _same))
        value = convert(_parse_optim_arg(text), where)
        if name is None:
            continue
        if name not in GROUP_OPTIONS:
            known = sorted({*foreign, *GROUP_OPTIONS})
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}. Known: {known}")
        if name in options:
            raise ValueError(f"{where}: {key} is given twice in {optim_args!r}")
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
    "galore8bit", ``galore_adafactor`` -> "galore" around Adafactor, ``apollo_adamw`` -> "apollo", and each
    ``*_layerwise`` form to the same with ``layerwise=True``. GaLore's ``optim_args`` keys ``rank``,
    ``update_proj_gap`` (our ``update_gap``) and ``scale`` keep transformers' defaults (128, 200, 0.25); APOLLO's
    are apollo-torch's (:data:`APOLLO_TORCH_KEYS`: ``rank`` 128, ``proj`` "random", ``scale_type`` "channel",
    ``update_proj_gap`` 200, ``scale`` 1, whose square root is our ``scale``); ``proj_type`` must be "std"; any
    other option of ours may be given by its name (``projector=rsvd``, ``proj_bits=4``).

    Args:
        args: the run's ``TrainingArguments``.
        model: the model, to resolve ``optim_target_modules`` with transformers' meaning
            (:func:`hf_target_module_names`); without it ``target_modules`` stays our default "all-linear".

    Raises:
        ValueError: for an ``optim`` other than transformers' GaLore and APOLLO values (lomo, plain AdamW...), an
            unknown or invalid ``optim_args`` key, or target modules that select nothing.
    """
    name = _optim_name(args)
    if name not in HF_LOWRANK_OPTIMIZERS:
        raise ValueError(
            f"TrainingArguments.optim={name!r} is not a GaLore or APOLLO optimizer this package implements; "
            f"LowRankTrainer reads {sorted(HF_LOWRANK_OPTIMIZERS)}, or pass lowrank=LowRankOptimizerConfig(...) "
            f"(methods {optimizer_names()}). For {name!r} itself use transformers.Trainer"
        )
    method, base, layerwise = HF_LOWRANK_OPTIMIZERS[name]
    foreign = APOLLO_TORCH_KEYS if name in HF_APOLLO_OPTIMIZERS else GALORE_TORCH_KEYS
    options = _options_from_optim_args(args.optim_args, foreign)
    if model is not None:
        options["target_modules"] = hf_target_module_names(model, args.optim_target_modules)
    else:
        _check_hf_target_modules(args.optim_target_modules)
    return LowRankOptimizerConfig(method=method, base=base, layerwise=layerwise, **options)
