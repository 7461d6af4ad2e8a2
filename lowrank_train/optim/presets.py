"""Ready-made GaLore optimizers: the two-line replacements for AdamW, 8-bit AdamW and Adafactor."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lowrank_train.optim.galore import GaLore
from lowrank_train.optim.options import options_doc

QGALORE_DEFAULTS: dict[str, Any] = {"proj_bits": 4, "adaptive_refresh": True}
"""Q-GaLore's group options where they differ from the schema's (Zhang et al. 2024, arXiv 2407.08296): INT4 basis,
adaptive refresh. The rest (``proj_group_size`` 256, ``refresh_threshold`` 0.4, ...) are the schema's defaults; the
optimizer registry's Q-GaLore entries read their defaults from here."""

_SHARED_ARGS = """
    Args:
        params: parameters or param groups, typically from :func:`~lowrank_train.optim.lowrank_param_groups`.
        lr: learning rate.
        **kwargs: the base optimizer's keyword arguments (``betas``, ``eps``, ``weight_decay``, ...), GaLore's
            ``nonfinite`` ("raise" or "skip", see :class:`~lowrank_train.optim.GaLore`), and any GaLore group
            option below as the default of every group.
"""


def _fused_adamw_supported(params: list[Any]) -> bool:
    """torch's fused AdamW kernel runs on CPU and CUDA floating tensors; it is ~3x faster than the per-op loop."""
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    return bool(tensors) and all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)


def _param_list(params: Any) -> list[Any]:
    # torch.optim takes a lone tensor as a group's params; list() of it would iterate its rows.
    return [params] if isinstance(params, torch.Tensor) else list(params)


class GaLoreAdamW(GaLore):
    """GaLore around ``torch.optim.AdamW``.

    Example:
        >>> opt = GaLoreAdamW(lowrank_param_groups(model, rank=128), lr=1e-3, weight_decay=0.0)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any):
        params = [dict(g, params=_param_list(g["params"])) if isinstance(g, dict) else g for g in params]
        if "foreach" not in kwargs and "fused" not in kwargs and _fused_adamw_supported(params):
            kwargs["fused"] = True
        super().__init__(params, base="adamw", lr=lr, **kwargs)


class GaLoreAdamW8bit(GaLore):
    """GaLore around bitsandbytes' blockwise 8-bit ``AdamW8bit``: 8-bit moments of the projected gradient.

    Runs wherever bitsandbytes' 8-bit optimizer runs (CUDA, and CPU with bitsandbytes >= 0.45). Tensors with
    fewer than ``min_8bit_size`` elements (bitsandbytes' default 4096) keep 32-bit moments.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any):
        super().__init__(params, base="adamw8bit", lr=lr, **kwargs)


class GaLoreAdafactor(GaLore):
    """GaLore around transformers' ``Adafactor`` with an explicit learning rate.

    ``relative_step`` and ``scale_parameter`` default to False: both scale the step by the parameter's RMS,
    which is meaningless for the projected space (whose shadow parameter is zero).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any):
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("warmup_init", False)
        super().__init__(params, base="adafactor", lr=lr, **kwargs)


class QGaLoreAdamW8bit(GaLore):
    """Q-GaLore (Zhang et al. 2024, arXiv 2407.08296): GaLore around bitsandbytes' ``AdamW8bit`` with a 4-bit
    packed basis and layer-adaptive refresh; INT8 weights from :func:`lowrank_train.nn.quantize_model` are
    written back with stochastic rounding.

    Defaults follow the paper: ``proj_bits`` 4 and ``proj_group_size`` 256, ``adaptive_refresh`` with
    ``refresh_threshold`` 0.4, ``refresh_growth`` 2 and ``refresh_history`` 5 (``max_update_gap`` 8 x
    ``update_gap``). Any of them can be overridden here or per param group.

    Example:
        >>> quantize_model(model)  # INT8 weights for the linear layers inside the blocks
        >>> opt = QGaLoreAdamW8bit(lowrank_param_groups(model, rank=256, update_gap=200), lr=1e-3)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any):
        super().__init__(params, base="adamw8bit", lr=lr, **_with_qgalore_defaults(kwargs))


class QGaLoreAdamW4bit(GaLore):
    """Q-GaLore with 4-bit projected moments: torchao's ``AdamW4bit`` as the inner optimizer (issue 8's what-if).

    Halves the moment memory of :class:`QGaLoreAdamW8bit` (0.5 instead of 1 byte per moment element, plus block
    scales). Needs ``pip install torchao``; torchao compiles its step with ``torch.compile`` on first use.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any):
        super().__init__(params, base="adamw4bit", lr=lr, **_with_qgalore_defaults(kwargs))


def _with_qgalore_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The paper's Q-GaLore defaults (:data:`QGALORE_DEFAULTS`), each overridable."""
    return {**QGALORE_DEFAULTS, **kwargs}


APOLLO_OPTIONS: dict[str, Any] = {"update": "apollo", "projector": "random", "scale": 1.0, "scale_type": "channel"}
"""APOLLO's low-rank group options (Zhu et al. 2024, arXiv 2412.05270 Sec. 5: random projection, channel-wise
scales, alpha 1, the limiter's gamma 1.01 from the rule); the paper's rank is 256 (:data:`APOLLO_RANK`)."""
APOLLO_RANK = 256
APOLLO_MINI_OPTIONS: dict[str, Any] = {
    "update": "apollo",
    "projector": "random",
    "scale": math.sqrt(128),
    "scale_type": "tensor",
    "rank": 1,
}
"""APOLLO-Mini (arXiv 2412.05270 Sec. 4.3): rank 1, one tensor-wise scale, alpha sqrt(128)."""
FIRA_OPTIONS: dict[str, Any] = {"update": "fira", "projector": "svd", "scale_type": "channel"}
"""Fira (Chen et al. 2024, arXiv 2410.01623): GaLore's SVD basis plus the scaled residual; alpha stays GaLore's."""


# Written over a group's own value: lowrank_param_groups always sets projector and scale (GaLore's "svd" and 0.25),
# which would otherwise silently turn APOLLO back into GaLore; rank 1 is what makes APOLLO-Mini.
_FORCED_OPTIONS = ("update", "projector", "scale", "rank")


def _with_method_options(params: Iterable[Any], options: Mapping[str, Any], where: str) -> list[Any]:
    """Puts the method's ``options`` into every low-rank group (one with ``rank``).

    Those in ``_FORCED_OPTIONS`` are written over the group's value, the others (``scale_type``) are defaults.
    A group that names another ``update`` rule is refused.
    """
    groups = []
    for item in params:
        if isinstance(item, dict) and "rank" in item:
            if item.get("update", options["update"]) != options["update"]:
                raise ValueError(
                    f"{where}: a param group asks for update={item['update']!r}; this optimizer is update="
                    f"{options['update']!r} (use GaLore(..., update=...) for another rule)"
                )
            forced = {k: v for k, v in options.items() if k in _FORCED_OPTIONS}
            item = {**options, **item, "params": _param_list(item["params"]), **forced}
        groups.append(item)
    return groups


def _adamw_kwargs(params: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    if "foreach" not in kwargs and "fused" not in kwargs and _fused_adamw_supported(params):
        kwargs["fused"] = True
    return kwargs


class APOLLOAdamW(GaLore):
    """APOLLO (Zhu et al. 2024, arXiv 2412.05270): AdamW moments of a seeded random projection only set per-channel
    learning-rate scales of the raw gradient; the update is full-rank, the state is (r x max(m, n)) moments + a seed.

    Low-rank groups get :data:`APOLLO_OPTIONS`: ``update="apollo"``, ``projector="random"`` and ``scale`` (this
    preset's ``scale``) written over theirs, ``scale_type="channel"`` as a default. The norm-growth limiter (gamma
    1.01) is on unless a group sets ``norm_growth_limit=float("inf")``. Gradient accumulation happens in ``.grad``
    (no ``accumulate_grad``).

    Example:
        >>> opt = APOLLOAdamW(lowrank_param_groups(model, rank=256, update_gap=200), lr=1e-2)
    """

    _options: Mapping[str, Any] = APOLLO_OPTIONS

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, scale: float | None = None, **kwargs: Any):
        options = dict(self._options) if scale is None else {**self._options, "scale": scale}
        params = _with_method_options(params, options, type(self).__name__)
        defaults = {k: v for k, v in options.items() if k != "rank"}  # rank is a group key only
        forced = {k: v for k, v in defaults.items() if k in _FORCED_OPTIONS}
        super().__init__(params, base="adamw", lr=lr, **_adamw_kwargs(params, {**defaults, **kwargs, **forced}))


class APOLLOMini(APOLLOAdamW):
    """APOLLO-Mini (arXiv 2412.05270 Sec. 4.3): rank 1, one tensor-wise scale per weight, alpha sqrt(128).

    SGD-like memory: per weight two 1 x max(m, n) moments, a seed and the limiter's norm. Low-rank groups get
    :data:`APOLLO_MINI_OPTIONS` (their ``rank`` becomes 1).

    Example:
        >>> opt = APOLLOMini(lowrank_param_groups(model, rank=1), lr=1e-2)
    """

    _options = APOLLO_MINI_OPTIONS


class QAPOLLOMini(APOLLOMini):
    """Q-APOLLO-Mini (arXiv 2412.05270 Sec. 5.4): APOLLO-Mini writing INT8 weights back with stochastic rounding.

    The same optimizer as :class:`APOLLOMini`; the INT8 weights come from :func:`lowrank_train.nn.quantize_model`
    and are re-quantized by the wrapper's write-back, as for Q-GaLore.

    Example:
        >>> quantize_model(model)
        >>> opt = QAPOLLOMini(lowrank_param_groups(model, rank=1), lr=1e-2)
    """


class FiraAdamW(APOLLOAdamW):
    """Fira (Chen et al. 2024, arXiv 2410.01623): GaLore's update plus the residual ``(I - P P^T) G`` scaled by the
    same per-channel ratio, with the norm-growth limiter on the residual (gamma 1.01). ``scale`` defaults to the
    group's (GaLore's 0.25); low-rank groups get :data:`FIRA_OPTIONS`.

    Example:
        >>> opt = FiraAdamW(lowrank_param_groups(model, rank=128, update_gap=200), lr=1e-2)
    """

    _options = FIRA_OPTIONS


for _preset in (
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAdafactor,
    QGaLoreAdamW8bit,
    QGaLoreAdamW4bit,
    APOLLOAdamW,
    APOLLOMini,
    QAPOLLOMini,
    FiraAdamW,
):
    _preset.__doc__ = f"{_preset.__doc__.rstrip()}\n{_SHARED_ARGS}\n{options_doc()}\n"
