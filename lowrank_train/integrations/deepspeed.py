"""DeepSpeed (optional extra): the configurations that can carry a GaLore optimizer, and a clear error for the rest.

GaLore needs each weight as its own (m x n) tensor, with its gradient, in the optimizer's param groups. What
DeepSpeed 0.19.8 does to a client optimizer (measured on CPU, ``DS_ACCELERATOR=cpu``, gloo):

* ZeRO 0, fp32: the optimizer is used as is and the engine all-reduces gradients (data parallel). Works.
* ZeRO 0 with ``"torch_autocast": {"enabled": true, "dtype": "bfloat16"}``: the same, with bf16 autocast in
  forward and fp32 weights. Works.
* ZeRO 0 with ``bf16`` or ``fp16``: ``FP16_UnfusedOptimizer`` puts fp32 master copies into the optimizer's param
  groups, so GaLore never sees its own weights: a silent no-op (the model does not train).
* ZeRO 1 and 2: every group is flattened into one 1-D partition per rank: the GaLore step crashes.
* ZeRO 3: parameters are partitioned into 1-D shards and the optimizer's groups are emptied: a silent no-op.

(ZeRO 1-3 also need ``zero_allow_untested_optimizer``.) :func:`check_deepspeed_config` refuses the last three
cases before DeepSpeed touches the optimizer; for sharded memory use FSDP2 with
:class:`~lowrank_train.integrations.fsdp.FSDP2GaLore`, which keeps per-parameter shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_FSDP2_HINT = (
    "For sharded (ZeRO-3-like) memory use FSDP2 instead: torch.distributed.fsdp.fully_shard with "
    "lowrank_train.integrations.fsdp.FSDP2GaLore, which keeps every weight's shape"
)


def load_deepspeed_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed config as a dict (``config`` may be a dict or the path of a JSON file)."""
    if isinstance(config, Mapping):
        return dict(config)
    with open(config, encoding="utf-8") as handle:
        return json.load(handle)


def check_deepspeed_config(config: Mapping[str, Any]) -> None:
    """Raises unless ``config`` lets DeepSpeed pass our optimizer its parameters with their shapes.

    Accepted: ZeRO stage 0 (or no ``zero_optimization``), fp32 weights, optionally ``torch_autocast``, and no
    ``optimizer`` section (the optimizer is ours, passed as ``optimizer=``).

    Raises:
        ValueError: for ZeRO stage 1, 2 or 3, for ``fp16`` / ``bf16`` (master-weight wrappers), and for an
            ``optimizer`` section; the message names the alternative.
    """
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage != 0:
        raise ValueError(
            f"DeepSpeed ZeRO stage {stage!r} cannot carry a GaLore optimizer: stages 1 and 2 flatten the parameters "
            "into 1-D partitions and stage 3 shards them, so no (m x n) weight is left to project (stage 1/2 "
            "crash in the optimizer step, stage 3 silently skips every update). Use ZeRO stage 0 (data parallel). "
            + _FSDP2_HINT
        )
    for key in ("fp16", "bf16"):
        if (config.get(key) or {}).get("enabled", False) not in (False, "false"):
            raise ValueError(
                f'DeepSpeed "{key}" wraps the optimizer in a master-weight optimizer that swaps fp32 copies into its '
                "param groups, so GaLore would never update the model. Keep fp32 weights and use "
                '"torch_autocast": {"enabled": true, "dtype": "bfloat16"} for mixed precision'
            )
    if "optimizer" in config:
        raise ValueError(
            'remove the "optimizer" section of the DeepSpeed config: DeepSpeed would build its own optimizer. Pass '
            "the GaLore optimizer as deepspeed_initialize(model, optimizer, config)"
        )


def deepspeed_initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Mapping[str, Any] | str | os.PathLike,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``deepspeed.initialize`` with our optimizer as the client optimizer, after :func:`check_deepspeed_config`.

    Args:
        model: the model (fp32 weights).
        optimizer: a GaLore / Q-GaLore optimizer built on ``model``'s parameters.
        config: DeepSpeed config dict or JSON path.
        **kwargs: more ``deepspeed.initialize`` arguments (``lr_scheduler``, ``training_data``...).

    Returns:
        What ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.

    Raises:
        ValueError: for a configuration that would flatten or replace the optimizer's parameters.
        ImportError: when deepspeed is not installed (``pip install lowrank-train[deepspeed]``).
    """
    config = load_deepspeed_config(config)
    check_deepspeed_config(config)
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError("deepspeed is not installed: pip install 'lowrank-train[deepspeed]'") from err
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
