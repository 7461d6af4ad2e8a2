"""Ready-made GaLore optimizers: the two-line replacements for AdamW, 8-bit AdamW and Adafactor."""

from __future__ import annotations

from collections.abc import Iterable
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


for _preset in (GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor, QGaLoreAdamW8bit, QGaLoreAdamW4bit):
    _preset.__doc__ = f"{_preset.__doc__.rstrip()}\n{_SHARED_ARGS}\n{options_doc()}\n"
