"""The one schema of GaLore's group options: names, defaults, types and ranges, checked where a value enters.

:func:`lowrank_param_groups`, :class:`~lowrank_train.optim.GaLore` (its constructor and ``add_param_group``) and
the presets all validate through :func:`validate_group_options`, so an unknown key, a typo, galore-torch's names
(``update_proj_gap``, ``proj_type``) or a value out of range is refused at the first call, with the option spelled
as in the API that raised it (issue 12 item 8, issue 15 item 1). numpy scalars are accepted and converted.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from lowrank_train.optim.update_rules import SCALE_TYPES, UPDATE_RULES, get_update_rule
from lowrank_train.projection import PROJECTORS, get_projector, validate_adaptive_options
from lowrank_train.quant import BASIS_BITS, bits_allowed, check_bits

# Keys any group may carry besides options: torch.optim's own, names, and what LR schedulers write into groups.
BOOKKEEPING_KEYS = frozenset(
    {"params", "param_names", "name", "initial_lr", "base_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"}
)
# galore-torch's (and transformers' optim_args) group keys that are spelled differently here, or do not exist.
FOREIGN_NAMES = {
    "update_proj_gap": "galore-torch's update_proj_gap is called update_gap here",
    "proj_type": (
        "galore-torch's proj_type has no equivalent here: GaLore always projects each weight on its smaller side "
        "(galore-torch's default 'std'); remove it"
    ),
    "galore_scale": "the GaLore scale (alpha) is called scale here",
}


class _Invalid(ValueError):
    """A value outside an option's type or range; the caller adds where it was given."""


@dataclass(frozen=True)
class GroupOption:
    """One GaLore group option.

    Attributes:
        name: the key, as written in a param group or passed as a keyword.
        default: its value when not given (``rank`` has none: it marks a group as low-rank).
        allowed: what the value may be, in words (used by the errors and the docs).
        doc: what it does.
        parse: returns the value in canonical form (numpy scalars to Python ones) or raises ``_Invalid``.
    """

    name: str
    default: Any
    allowed: str
    doc: str
    parse: Callable[[Any], Any]


def _integer(minimum: int | None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _Invalid
        if minimum is not None and value < minimum:
            raise _Invalid
        return int(value)

    return parse


def _real(low: float, *, open_low: bool, high: float = math.inf) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise _Invalid
        if value < low or (open_low and value == low) or value > high:
            raise _Invalid
        return float(value)

    return parse


def _boolean(value: Any) -> bool:
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise _Invalid


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else parse(value)


def _proj_bits(value: Any) -> int | None:
    try:
        return check_bits(value, BASIS_BITS, name="proj_bits")
    except ValueError:
        raise _Invalid from None


PROJ_DTYPES = {"bfloat16": torch.bfloat16}


def _proj_dtype(value: Any) -> str | None:
    if value is None:
        return None
    if value is torch.bfloat16 or value == "bf16":
        return "bfloat16"
    if not isinstance(value, str) or value not in PROJ_DTYPES:
        raise _Invalid
    return value


def _projector(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid
    try:
        get_projector(value)
    except ValueError:
        raise _Invalid(f"{_did_you_mean(value, PROJECTORS)}; registered: {sorted(PROJECTORS)}") from None
    return value


def _update_rule(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid
    try:
        get_update_rule(value)
    except ValueError:
        raise _Invalid(f"{_did_you_mean(value, UPDATE_RULES)}; registered: {sorted(UPDATE_RULES)}") from None
    return value


def _scale_type(value: Any) -> str:
    if value not in SCALE_TYPES:
        raise _Invalid
    return value


def _growth_limit(value: Any) -> float | None:
    if value is None:
        return None
    # gamma = 1 would cap every update at the previous one's norm: it can only shrink, so it is refused.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value <= 1:
        raise _Invalid
    return float(value)


_OPTIONS = [
    GroupOption("rank", None, "a positive integer",
                "projection rank r; its presence makes a group low-rank (a group key, not an optimizer keyword)",
                _integer(1)),
    GroupOption("update_gap", 200, "an integer >= 1", "steps between basis refreshes", _integer(1)),
    GroupOption("scale", 0.25, "a finite number > 0", "GaLore's alpha, multiplies the projected-back update",
                _real(0.0, open_low=True)),
    GroupOption("projector", "svd", "a registered projector name", "how the basis is built: 'svd', 'rsvd', "
                "'random' or 'identity' (lowrank_train.projection.register_projector adds more)", _projector),
    GroupOption("proj_seed", 0, "an integer", "seeds the 'rsvd' and 'random' projectors", _integer(None)),
    GroupOption("seed_offset", 0, "an integer >= 0", "added to each parameter's index in the seed", _integer(0)),
    GroupOption("oversample", 8, "an integer >= 0", "extra sketch columns of 'rsvd'", _integer(0)),
    GroupOption("power_iters", 1, "an integer >= 0", "subspace iterations of 'rsvd'", _integer(0)),
    GroupOption("full_rank_fallback", False, "True or False",
                "give weights with rank >= min(m, n) the plain update instead of refusing them", _boolean),
    GroupOption("proj_bits", None, f"{bits_allowed(BASIS_BITS, optional=True)} (float basis)",
                "Q-GaLore: store the basis as INT4/INT8 codes",
                _proj_bits),
    GroupOption("proj_dtype", None, "None (the gradient's dtype) or 'bfloat16'",
                "dtype the projection R = P^T G is computed in; R comes back in the gradient's dtype. 'bfloat16' "
                "rounds G and P to 8 mantissa bits for that product (bf16 matmul units: about 4x faster on an "
                "AVX-512 BF16 CPU)", _proj_dtype),
    GroupOption("proj_group_size", 256, "a positive integer (even for proj_bits=4)",
                "elements per quantization group of the basis codes", _integer(1)),
    GroupOption("adaptive_refresh", False, "True or False",
                "Q-GaLore: grow the gap while the subspace stays put, shrink it when it moves", _boolean),
    GroupOption("refresh_threshold", 0.4, "in (0, 1]", "mean subspace overlap at which the gap grows",
                _real(0.0, open_low=True, high=1.0)),
    GroupOption("refresh_growth", 2.0, "a finite number > 1", "factor the gap grows or shrinks by",
                _real(1.0, open_low=True)),
    GroupOption("refresh_history", 5, "an integer >= 1", "refreshes the overlap is averaged over", _integer(1)),
    GroupOption("max_update_gap", None, "an integer >= update_gap, or None (8 x update_gap)",
                "largest adaptive gap", _optional(_integer(1))),
    GroupOption("update", "galore", "a registered update rule name",
                "how the full update is formed from the inner update: 'galore' (P R~), 'apollo' (G scaled by "
                "||R~||/||R||), 'fira' (P R~ plus the scaled residual); see lowrank_train.optim.update_rules",
                _update_rule),
    GroupOption("scale_type", "channel", f"one of {SCALE_TYPES}",
                "APOLLO / Fira: one scale per channel (the non-projected side) or one per tensor", _scale_type),
    GroupOption("norm_growth_limit", None, "None (the update rule's default), a number > 1, or inf (off)",
                "gamma of the norm-growth limiter (Fira Sec. 3.3); None: off for 'galore', 1.01 for 'apollo' "
                "and 'fira'", _growth_limit),
]  # fmt: skip
GROUP_OPTIONS: dict[str, GroupOption] = {option.name: option for option in _OPTIONS}
GALORE_DEFAULTS: dict[str, Any] = {o.name: o.default for o in _OPTIONS if o.name != "rank"}


# ----- the base optimizer's options ---------------------------------------------------------------------------
def _lr(value: Any) -> Any:
    if torch.is_tensor(value) and value.numel() == 1 and bool(torch.isfinite(value).all()) and float(value) >= 0:
        return value  # torch.optim accepts a tensor learning rate
    return _real(0.0, open_low=False)(value)


def _eps(value: Any) -> Any:
    if isinstance(value, (tuple, list)):  # Adafactor's (eps1, eps2)
        return type(value)(_eps(v) for v in value)
    return _real(0.0, open_low=False)(value)


def _betas(value: Any) -> Any:
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        raise _Invalid
    for beta in value:
        if not torch.is_tensor(beta):
            _real(0.0, open_low=False, high=1.0)(beta)
            if beta == 1.0:
                raise _Invalid
    return value


# Options of the common base optimizers whose wrong types would otherwise fail deep inside torch.
BASE_OPTION_CHECKS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "lr": ("a finite number >= 0 (or a 1-element tensor)", _lr),
    "weight_decay": ("a finite number >= 0", _real(0.0, open_low=False)),
    "eps": ("a finite number >= 0 (or a tuple of them)", _eps),
    "betas": ("a tuple of numbers in [0, 1)", _betas),
}


@cache
def base_option_names(base_cls: type[torch.optim.Optimizer]) -> frozenset[str] | None:
    """The group keys ``base_cls`` understands: its constructor's keywords and its ``defaults``.

    Returns:
        The names, or ``None`` when the constructor takes ``**kwargs`` (then any key may be meant for it).
    """
    try:
        signature = inspect.signature(base_cls.__init__)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    names = {name for name in signature.parameters if name not in ("self", "params")}
    try:  # some bases add group keys of their own (bitsandbytes: alpha, t_alpha, t_beta3)
        names |= set(base_cls([torch.zeros(1, requires_grad=True)]).defaults)
    except Exception:  # noqa: BLE001 - a base whose constructor needs more than a parameter: its signature only
        pass
    return frozenset(names)


@cache
def registered_base_option_names() -> frozenset[str]:
    """Option names of every registered base optimizer that imports here (for :func:`lowrank_param_groups`)."""
    from lowrank_train.optim.bases import BASE_OPTIMIZERS, resolve_base

    names: set[str] = set()
    for name in BASE_OPTIMIZERS:
        try:
            names |= base_option_names(resolve_base(name)) or set()
        except ValueError:  # its package is not installed
            continue
    return frozenset(names)


# ----- validation ---------------------------------------------------------------------------------------------
def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_option_names(
    keys: Iterable[str],
    *,
    where: str,
    base_names: frozenset[str] | None,
    extra: Iterable[str] = (),
    kind: str = "option",
) -> None:
    """Raises ``ValueError`` for a key that is neither a GaLore option, a base optimizer option nor bookkeeping.

    Args:
        keys: the keys given.
        where: the API, as the message should name it (``"lowrank_param_groups"``, ``"GaLoreAdamW param group 1"``).
        base_names: the base optimizer's option names; ``None`` when it takes any keyword (then only typos of
            GaLore's options and galore-torch's names are refused).
        extra: further keys this API accepts.
        kind: "option" (keyword arguments) or "key" (param-group entries), for the message.
    """
    galore = set(GROUP_OPTIONS)
    known = galore | set(extra) | (set(base_names) if base_names is not None else set())
    for key in keys:
        if key in known or (key in BOOKKEEPING_KEYS and kind == "key"):
            continue
        if key in FOREIGN_NAMES:
            raise ValueError(f"{where}: unknown {kind} {key!r}: {FOREIGN_NAMES[key]}")
        hint = _did_you_mean(key, known)
        if base_names is None and not hint:
            continue  # the base optimizer takes **kwargs: it may be one of its options
        listed = f"GaLore's {sorted(galore)}"
        if base_names is not None:
            listed += f", the base optimizer's {sorted(set(base_names) | set(extra))}"
        if kind == "key":
            listed += f" and {sorted(BOOKKEEPING_KEYS)}"
        raise ValueError(f"{where}: unknown {kind} {key!r}{hint}. Known: {listed}")


def check_option_names_for_any_base(keys: Iterable[str], *, where: str) -> None:
    """:func:`check_option_names` when the base optimizer is not known yet (:func:`lowrank_param_groups`).

    A key is accepted when it is a GaLore option or an option of any registered base optimizer. The bases other
    than torch's are imported only when a key is not found among torch's AdamW / Adam / SGD options.
    """
    keys = list(keys)
    cheap = set(GROUP_OPTIONS)
    for cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
        cheap |= base_option_names(cls) or set()
    if all(key in cheap for key in keys):
        return
    hint = "; for a base optimizer of your own, register it in lowrank_train.optim.BASE_OPTIMIZERS"
    try:
        check_option_names(keys, where=where, base_names=registered_base_option_names())
    except ValueError as err:
        raise ValueError(f"{err}{hint}") from None


def validate_group_options(options: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Checks the values of the GaLore and common base options present in ``options``.

    Args:
        options: keys and values as given (unknown keys are :func:`check_option_names`' job and pass through).
        where: the API, as the message should name it.

    Returns:
        A copy with GaLore's values in canonical form (numpy integers and floats as Python ones).

    Raises:
        ValueError: naming the option, what is allowed and the value given.
    """
    checked = dict(options)
    for key, value in options.items():
        if key in GROUP_OPTIONS:
            option = GROUP_OPTIONS[key]
            allowed, parse = option.allowed, option.parse
        elif key in BASE_OPTION_CHECKS:
            allowed, parse = BASE_OPTION_CHECKS[key]
        else:
            continue
        try:
            checked[key] = parse(value)
        except _Invalid as err:
            raise ValueError(f"{where}: {key} must be {allowed}, got {value!r}{err}") from None
    _check_rule_has_a_projection(checked, where)
    return checked


def _check_rule_has_a_projection(group: Mapping[str, Any], where: str) -> None:
    """A param group that names a full-rank update rule without ``rank`` would silently get the plain update."""
    rule = group.get("update", GALORE_DEFAULTS["update"])
    if "params" not in group or "rank" in group or rule == GALORE_DEFAULTS["update"]:
        return
    params = group["params"]
    params = [params] if torch.is_tensor(params) else list(params) if not isinstance(params, set) else []
    shapes = ", ".join(str(tuple(p.shape)) for p in params[:4]) + (", ..." if len(params) > 4 else "")
    one_d = any(torch.is_tensor(p) and p.dim() != 2 for p in params)
    fix = ": a rule cannot act on a 1-D parameter, remove update from it" if one_d else "; add rank or drop update"
    raise ValueError(
        f"{where}: update={rule!r} is a rule of low-rank groups (a 'rank' key, 2-D weights only), but this group "
        f"has no rank (parameter shapes {shapes}){fix}"
    )


def check_group_option(key: str, value: Any) -> Any:
    """One GaLore group option's value in canonical form (configs that mirror the schema check through this).

    Raises:
        ValueError: ``"<key> must be <allowed>, got <value>"``; also for a key that is not a GaLore option.
    """
    if key not in GROUP_OPTIONS:
        raise ValueError(f"{key!r} is not a GaLore group option{_did_you_mean(key, GROUP_OPTIONS)}")
    option = GROUP_OPTIONS[key]
    try:
        return option.parse(value)
    except _Invalid as err:
        raise ValueError(f"{key} must be {option.allowed}, got {value!r}{err}") from None


def check_lowrank_group(group: Mapping[str, Any], *, where: str) -> None:
    """The checks that relate options of one low-rank group (all of them present, already parsed)."""
    if group["proj_bits"] == 4 and group["proj_group_size"] % 2:
        raise ValueError(
            f"{where}: proj_bits=4 packs two codes per byte, so proj_group_size must be even, "
            f"got {group['proj_group_size']}"
        )
    if group["adaptive_refresh"]:
        try:
            validate_adaptive_options(
                group["refresh_threshold"],
                group["refresh_growth"],
                group["refresh_history"],
                group["update_gap"],
                max_update_gap(group),
            )
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def max_update_gap(group: Mapping[str, Any]) -> int:
    """The largest adaptive gap of ``group``: ``max_update_gap``, or 8 x ``update_gap`` when it is None."""
    return 8 * group["update_gap"] if group["max_update_gap"] is None else group["max_update_gap"]


def options_doc(indent: str = "    ") -> str:
    """The option list appended to the optimizers' docstrings, so that ``help(GaLoreAdamW)`` shows it.

    Args:
        indent: prefix of every line (a class docstring's own indentation).
    """
    lines = [
        "GaLore group options: keys of a param group (``lowrank_param_groups`` sets them), or keywords of the",
        "optimizer, which then become the default of every group. Unknown keys are refused.",
        "",
    ]
    for option in _OPTIONS:
        default = "required in low-rank groups" if option.name == "rank" else f"default {option.default!r}"
        lines.append(f"    ``{option.name}`` ({option.allowed}; {default}): {option.doc}.")
    return "\n".join(indent + line if line else "" for line in lines)
