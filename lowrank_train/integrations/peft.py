"""PEFT models with our optimizers: LoRA adapters are already low-rank, so they never get projected.

``lowrank_param_groups`` finds projectable weights by module type; on a PEFT model the adapters ``lora_A`` /
``lora_B`` are ``nn.Linear`` modules too, and "all-linear" would project them (rank r inside rank r: no memory
saved, and a rank >= r adapter makes GaLore refuse the group). :func:`peft_param_groups` moves every adapter
parameter to the plain group. What stays projected are the linear weights trained in full next to the adapters:
layers unfrozen by hand, or a ``modules_to_save`` copy. A pure LoRA model therefore gets one plain group, and a
GaLore optimizer on it is simply its base optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lowrank_train.optim import lowrank_param_groups


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter that belongs to a PEFT tuner layer but not to the layer it wraps.

    Covers LoRA (``lora_A``, ``lora_B``, ``lora_magnitude_vector``, embedding adapters) and the other PEFT tuners
    built on ``BaseTunerLayer`` (IA3, LoHa, ...). Returns an empty set for a model without PEFT layers, or when
    peft is not installed.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    adapters: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            wrapped = {id(p) for p in module.get_base_layer().parameters()}
            adapters.update(id(p) for p in module.parameters() if id(p) not in wrapped)
    return adapters


def peft_param_groups(
    model: nn.Module,
    rank: int,
    update_gap: int = 200,
    scale: float = 0.25,
    projector: str = "svd",
    target_modules: str | Sequence[str] = "all-linear",
    **group_options: Any,
) -> list[dict[str, Any]]:
    """:func:`~lowrank_train.optim.lowrank_param_groups` for a PEFT model: adapters go to the plain group.

    Args:
        model: a ``PeftModel`` (or any model holding PEFT tuner layers).
        rank, update_gap, scale, projector, target_modules, **group_options: as for ``lowrank_param_groups``;
            ``target_modules`` is matched against the PEFT model's full module names (``...mlp.up_proj``).

    Returns:
        The low-rank group (full-trained linear weights only) if any, and the plain group (adapters and every
        other trainable parameter).

    Raises:
        ValueError: when no trainable linear weight at all (adapter or not) matches ``target_modules``.
    """
    groups = lowrank_param_groups(
        model,
        rank=rank,
        update_gap=update_gap,
        scale=scale,
        projector=projector,
        target_modules=target_modules,
        **group_options,
    )
    adapters = adapter_parameter_ids(model)
    plain: dict[str, Any] = {"params": [], "param_names": []}
    result: list[dict[str, Any]] = []
    for group in groups:
        if "rank" not in group:
            plain["params"].extend(group["params"])
            plain["param_names"].extend(group["param_names"])
            continue
        kept = [(n, p) for n, p in zip(group["param_names"], group["params"], strict=True) if id(p) not in adapters]
        moved = [(n, p) for n, p in zip(group["param_names"], group["params"], strict=True) if id(p) in adapters]
        plain["params"].extend(p for _, p in moved)
        plain["param_names"].extend(n for n, _ in moved)
        if kept:
            result.append({**group, "params": [p for _, p in kept], "param_names": [n for n, _ in kept]})
    if plain["params"]:
        result.append(plain)
    return result


def welore_lora_model(model: nn.Module, lora_config: Any) -> nn.Module:
    """LoRA adapters on the dense (N-LRC) block linears of a WeLore-compressed model, LRC factors trained directly.

    Where the combination makes sense: WeLore's low-rank components are already factorized and train as they are
    (WeLore, Sec. 4), while the matrices kept dense are frozen; LoRA gives those a cheap low-rank update instead of
    leaving them untouched. ``lora_config.target_modules`` is filled with the dense block linears' names when it
    is empty. Train the result with any optimizer on its trainable parameters (all of them are already low-rank,
    so they belong in a plain group); ``merge_and_unload()`` followed by ``merge_lowrank`` gives a dense model.

    Args:
        model: a model compressed by :func:`lowrank_train.welore.compress_model` (or ``load_compressed``).
        lora_config: a ``peft.LoraConfig``.

    Returns:
        The ``PeftModel``: LoRA adapters and the LowRankLinear factors (and their biases) trainable, nothing else.

    Raises:
        ValueError: when the model has no LowRankLinear layer, or no dense block linear is left for LoRA.
    """
    import dataclasses

    from peft import get_peft_model

    from lowrank_train.nn import LowRankLinear
    from lowrank_train.welore.spectrum import find_block_linears

    factorized = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    if not factorized:
        raise ValueError("the model has no LowRankLinear layer: compress it with lowrank_train.welore first")
    try:
        dense = list(find_block_linears(model))
    except ValueError:  # every block linear was factorized
        dense = []
    if not dense and not lora_config.target_modules:
        raise ValueError("every block linear is factorized: there is no dense (N-LRC) layer left for LoRA")
    if not lora_config.target_modules:
        lora_config = dataclasses.replace(lora_config, target_modules=dense)
    peft_model = get_peft_model(model, lora_config)  # freezes every base parameter
    for module in factorized:
        for param in module.parameters():
            param.requires_grad_(True)
    return peft_model
