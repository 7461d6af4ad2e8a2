"""Ready-made GaLore optimizers: the two-line replacements for AdamW, 8-bit AdamW and Adafactor."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lowrank_train.optim.galore import GaLore


class GaLoreAdamW(GaLore):
    """GaLore around ``torch.optim.AdamW``.

    Example:
        >>> opt = GaLoreAdamW(lowrank_param_groups(model, rank=128), lr=1e-3, weight_decay=0.0)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any):
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
