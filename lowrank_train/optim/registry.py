"""The optimizer registry: one entry per training method, read by everything that names an optimizer.

Config validation (``optimizer.name``), the training loop, the memory estimator, ``lowrank-train --help`` and the
Trainer glue all look methods up here, so adding a method is one :func:`register_optimizer` call (plus its tests):

>>> register_optimizer(OptimizerMethod(
...     name="galore_adam", description="GaLore around torch Adam", base="adam", moment_bits=32, lowrank=True,
...     build=lambda groups, **hp: GaLore(groups, base="adam", **hp), group_options=GALORE_GROUP_OPTIONS))

Entries only name their classes: bitsandbytes and torchao are imported when a method that needs them is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from lowrank_train._registry import Registry
from lowrank_train.optim.bases import BASE_OPTIMIZERS, PER_PARAMETER_BASES, resolve_base
from lowrank_train.optim.galore import GALORE_DEFAULTS
from lowrank_train.optim.options import registered_base_option_names
from lowrank_train.optim.presets import (
    APOLLO_MINI_OPTIONS,
    APOLLO_OPTIONS,
    FIRA_OPTIONS,
    QGALORE_DEFAULTS,
    APOLLOAdamW,
    APOLLOMini,
    FiraAdamW,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    QAPOLLOMini,
    QGaLoreAdamW4bit,
    QGaLoreAdamW8bit,
)
from lowrank_train.optim.scale import build_scale, scale_state_bytes
from lowrank_train.quant import BASIS_BITS, MOMENT_BITS, TRAINED_WEIGHT_BITS, check_bits

Builder = Callable[..., torch.optim.Optimizer]
StateBytes = Callable[[str, int, int], int]
"""``state_bytes(role, numel, dtype_bytes) -> bytes``: a method's optimizer state for one parameter; ``role`` is
"embedding", "head", "norm" or "linear" (a block weight)."""
# Keys a GaLore low-rank param group takes (see lowrank_train.optim.galore): rank plus the wrapper's defaults.
GALORE_GROUP_OPTIONS = frozenset({"rank", *GALORE_DEFAULTS})


@dataclass(frozen=True)
class OptimizerMethod:
    """What every consumer needs to know about one optimizer method.

    Attributes:
        name: the registry key (``optimizer.name`` in recipes, ``method`` in the Trainer glue, the estimator's
            ``optimizer``): lower case, no spaces.
        description: one line for ``--help`` and error messages.
        base: the inner optimizer's name in :data:`lowrank_train.optim.BASE_OPTIMIZERS` (the optimizer itself for
            methods that do not project).
        moment_bits: bits per Adam moment element of the inner optimizer: 32, 8 (bitsandbytes' blockwise) or 4
            (torchao's ``AdamW4bit``).
        lowrank: GaLore family: projects the gradients of linear weights (takes low-rank param groups, can write
            INT8 weights back with stochastic rounding).
        build: ``build(param_groups, **hyperparameters) -> Optimizer``; the hyperparameters are ``lr``,
            ``weight_decay``, ``betas`` and ``eps``. Import optional packages inside it, not at module level.
        weight_bits: default bits of the block linear weights: 8 for INT8 weights (Q-GaLore), ``None`` for float.
        proj_bits: default bits of the stored projection basis (4 or 8), ``None`` for fp32.
        adaptive_refresh: default of the layer-adaptive refresh gap.
        group_options: the param-group keys the method accepts beyond ``params`` / ``param_names`` and the base
            optimizer's hyperparameters (:data:`GALORE_GROUP_OPTIONS` for the GaLore family).
        any_base: the method is the plain GaLore wrapper, so integrations may put any registered base optimizer
            inside it (the Trainer glue's ``base=``) or its FSDP2 variant around sharded parameters.
        method_options: low-rank group options the method fixes (its builder writes them into every low-rank group,
            over ``optimizer.projector`` / ``scale`` / ``rank``): APOLLO's ``update``, ``projector``, ``scale``...
            The memory estimator reads ``projector`` and ``rank`` from here.
        state_bytes: the state bytes of one parameter by role (:data:`StateBytes`), for a method whose state is not
            the base optimizer's two moments everywhere (SCALE: the head's momentum only); ``None``: two moments
            of ``moment_bits`` per element of every parameter. The memory estimator reads it.
    """

    name: str
    description: str
    base: str
    moment_bits: int
    lowrank: bool
    build: Builder
    weight_bits: int | None = None
    proj_bits: int | None = None
    adaptive_refresh: bool = False
    group_options: frozenset[str] = field(default_factory=frozenset)
    any_base: bool = False
    method_options: Mapping[str, Any] = field(default_factory=dict)
    state_bytes: StateBytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.lower() or " " in self.name:
            raise ValueError(f"an optimizer method name is a lower-case string without spaces, got {self.name!r}")
        where = f"optimizer method {self.name!r}"
        if self.base not in BASE_OPTIMIZERS:
            raise ValueError(f"{where}: base must be one of {sorted(BASE_OPTIMIZERS)}, got {self.base!r}")
        if not callable(self.build):
            raise ValueError(f"{where}: build must be callable, got {self.build!r}")
        if self.state_bytes is not None and not callable(self.state_bytes):
            raise ValueError(f"{where}: state_bytes must be None or callable, got {self.state_bytes!r}")
        for key, allowed, optional in (
            ("moment_bits", MOMENT_BITS, False),
            ("weight_bits", TRAINED_WEIGHT_BITS, True),
            ("proj_bits", BASIS_BITS, True),
        ):
            try:
                check_bits(getattr(self, key), allowed, name=key, optional=optional)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        object.__setattr__(self, "group_options", frozenset(self.group_options))
        object.__setattr__(self, "method_options", MappingProxyType(dict(self.method_options)))
        # Only a projecting optimizer has a basis, and only its write-back can update INT8 weights.
        projecting = ("weight_bits", "proj_bits", "adaptive_refresh", "any_base", "group_options", "method_options")
        misplaced = [key for key in projecting if getattr(self, key)]
        if not self.lowrank and misplaced:
            raise ValueError(f"{where} does not project gradients (lowrank=False), so it cannot set {misplaced}")

    def accepts(self, option: str) -> bool:
        """True when ``option`` is a param-group key this method takes (``proj_bits``, ``adaptive_refresh``...)."""
        return option in self.group_options


_REGISTRY: Registry[OptimizerMethod] = Registry("optimizer", OptimizerMethod)


def register_optimizer(method: OptimizerMethod, *, replace: bool = False) -> OptimizerMethod:
    """Adds ``method`` to the registry and returns it.

    Raises:
        ValueError: when the name is taken and ``replace`` is False, or ``method`` is not an OptimizerMethod.
    """
    return _REGISTRY.add(method, replace=replace)


def unregister_optimizer(name: str) -> OptimizerMethod:
    """Removes a method from the registry and returns its entry.

    Raises:
        ValueError: for a name that is not registered.
    """
    method = get_optimizer_method(name)
    del _REGISTRY[method.name]
    return method


@contextlib.contextmanager
def registered_optimizer(method: OptimizerMethod) -> Iterator[OptimizerMethod]:
    """Registers ``method`` for the ``with`` block only (restoring an entry it replaced); for tests and notebooks."""
    previous = _REGISTRY.get(method.name)
    register_optimizer(method, replace=True)
    try:
        yield method
    finally:
        if previous is None:
            _REGISTRY.pop(method.name, None)
        else:
            _REGISTRY[method.name] = previous


def get_optimizer_method(name: str) -> OptimizerMethod:
    """The registry entry of ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the registered names and the closest match.
    """
    return _REGISTRY.lookup(name)


def optimizer_names(*, lowrank: bool | None = None) -> tuple[str, ...]:
    """Registered method names in registration order; ``lowrank`` keeps only the GaLore family (True) or the rest."""
    return tuple(n for n, m in _REGISTRY.items() if lowrank is None or m.lowrank == lowrank)


def register_base_optimizer(
    name: str, target: str | type[torch.optim.Optimizer], *, per_parameter: bool = False, replace: bool = False
) -> None:
    """Adds an inner optimizer to :data:`~lowrank_train.optim.BASE_OPTIMIZERS` (``base=`` of GaLore and methods).

    Args:
        name: the name ``base=`` takes (matched lower case).
        target: the class, or ``"module:attribute"`` to import it only when used.
        per_parameter: its ``step`` updates each parameter from that parameter's gradient and state alone (no
            global norm or counter), so GaLore may step the projected weights a few at a time
            (:data:`~lowrank_train.optim.bases.PER_PARAMETER_BASES`).
        replace: allow replacing a registered name.

    Raises:
        ValueError: when the name is taken and ``replace`` is False, or ``target`` is neither.
    """
    if isinstance(target, type) and issubclass(target, torch.optim.Optimizer):
        target = f"{target.__module__}:{target.__qualname__}"
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"base optimizer {name!r}: target must be an Optimizer class or 'module:attribute'")
    key = name.lower()
    if key in BASE_OPTIMIZERS and not replace:
        raise ValueError(f"base optimizer {key!r} is already registered (pass replace=True to replace it)")
    BASE_OPTIMIZERS[key] = target
    if per_parameter:
        PER_PARAMETER_BASES.add(key)
    else:
        PER_PARAMETER_BASES.discard(key)
    registered_base_option_names.cache_clear()


def describe_optimizers() -> str:
    """One line per method, ``name: description``, for ``--help`` texts."""
    return "\n".join(f"{m.name}: {m.description}" for m in _REGISTRY.values())


def _base_builder(base: str) -> Builder:
    """Builds the registered base optimizer ``base`` itself over the groups (no projection)."""

    def build(param_groups: list[dict[str, Any]], **hyperparameters: Any) -> torch.optim.Optimizer:
        return resolve_base(base)(param_groups, **hyperparameters)

    build.__name__ = f"build_{base}"
    return build


# The built-in methods, one row each: (name, description, base, moment bits, builder, family options).
_GALORE: dict[str, Any] = {"lowrank": True, "group_options": GALORE_GROUP_OPTIONS}
# Q-GaLore's defaults (Zhang et al. 2024, arXiv 2407.08296): INT8 weights, and the presets' group defaults (INT4
# basis, adaptive refresh).
_QGALORE: dict[str, Any] = {**_GALORE, "weight_bits": 8, **QGALORE_DEFAULTS}
_PLAIN: dict[str, Any] = {"lowrank": False}
for _name, _description, _base, _bits, _build, _family in (
    ("adamw", "torch AdamW on every parameter (the reference)", "adamw", 32, _base_builder("adamw"), _PLAIN),
    ("adamw8bit", "bitsandbytes' 8-bit AdamW on every parameter", "adamw8bit", 8, _base_builder("adamw8bit"), _PLAIN),
    ("galore", "GaLore around AdamW (projected gradients)", "adamw", 32, GaLoreAdamW, {**_GALORE, "any_base": True}),
    ("galore8bit", "GaLore around bitsandbytes' 8-bit AdamW", "adamw8bit", 8, GaLoreAdamW8bit, _GALORE),
    (
        "qgalore",
        "Q-GaLore: 8-bit AdamW, INT4 basis, adaptive refresh, INT8 weights",
        "adamw8bit",
        8,
        QGaLoreAdamW8bit,
        _QGALORE,
    ),
    ("qgalore4bit", "Q-GaLore with 4-bit states (torchao's AdamW4bit)", "adamw4bit", 4, QGaLoreAdamW4bit, _QGALORE),
    # APOLLO / Fira (issue 21): full-rank structured updates in the same wrapper (lowrank_train.optim.update_rules).
    (
        "apollo",
        "APOLLO: random-projection AdamW moments scale the raw gradient per channel",
        "adamw",
        32,
        APOLLOAdamW,
        {**_GALORE, "method_options": APOLLO_OPTIONS},
    ),
    (
        "apollo_mini",
        "APOLLO-Mini: rank 1, one tensor-wise scale, alpha sqrt(128)",
        "adamw",
        32,
        APOLLOMini,
        {**_GALORE, "method_options": APOLLO_MINI_OPTIONS},
    ),
    (
        "qapollo_mini",
        "Q-APOLLO-Mini: APOLLO-Mini with INT8 weights (stochastic rounding)",
        "adamw",
        32,
        QAPOLLOMini,
        {**_GALORE, "weight_bits": 8, "method_options": APOLLO_MINI_OPTIONS},
    ),
    (
        "fira",
        "Fira: GaLore plus the scaled full-rank residual",
        "adamw",
        32,
        FiraAdamW,
        {**_GALORE, "method_options": FIRA_OPTIONS},
    ),
    # SCALE (arXiv 2506.16659): no projection, no second moments; 1-D parameters take AdamW (the "adamw" base).
    (
        "scale",
        "SCALE: column-normalized gradients, momentum on the output head only",
        "adamw",
        32,
        build_scale,
        {**_PLAIN, "state_bytes": scale_state_bytes},
    ),
):
    register_optimizer(
        OptimizerMethod(name=_name, description=_description, base=_base, moment_bits=_bits, build=_build, **_family)
    )

__all__ = [
    "GALORE_GROUP_OPTIONS",
    "OptimizerMethod",
    "describe_optimizers",
    "get_optimizer_method",
    "optimizer_names",
    "register_base_optimizer",
    "register_optimizer",
    "registered_optimizer",
    "unregister_optimizer",
]
