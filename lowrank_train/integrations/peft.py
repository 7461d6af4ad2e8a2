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

from lowrank_train.nn.surgery import block_modules, find_target_modules, is_dense_linear
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


def base_model_names(model: nn.Module) -> dict[str, str]:
    """Qualified name in ``model`` -> the name the module has in the wrapped base model, where PEFT matches.

    PEFT matches ``LoraConfig.target_modules`` against the base model's names (``model.layers.0.mlp.up_proj``),
    before it wraps anything. Here the ``base_model.model.`` prefix is dropped, a tuner layer's wrapped layer
    (``...q_proj.base_layer``) takes the tuner's name (``...q_proj``), and so do both copies inside a
    ``modules_to_save`` wrapper (``...lm_head.original_module``, ``...lm_head.modules_to_save.default``). Adapter
    modules keep their (base-relative) names. Without peft installed, every name maps to itself.
    """
    getter = getattr(model, "get_base_model", None)
    base = getter() if callable(getter) else model
    names = {id(module): name for name, module in base.named_modules()}
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        BaseTunerLayer = ModulesToSaveWrapper = ()  # noqa: N806 - no tuner layers without peft
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer):
            names[id(module.get_base_layer())] = name
        if isinstance(module, ModulesToSaveWrapper):
            for copy in (module.original_module, *module.modules_to_save.values()):
                names[id(copy)] = name
    return {qualified: names.get(id(module), qualified) for qualified, module in model.named_modules()}


def peft_param_groups(
    model: nn.Module,
    rank: int,
    update_gap: int = 200,
    scale: float = 0.25,
    projector: str = "svd",
    target_modules: str | Sequence[str] = "all-linear",
    **group_options: Any,
) -> list[dict[str, Any]]:
    r""":func:`~lowrank_train.optim.lowrank_param_groups` for a PEFT model: adapters go to the plain group.

    Args:
        model: a ``PeftModel`` (or any model holding PEFT tuner layers).
        rank, update_gap, scale, projector, **group_options: as for ``lowrank_param_groups``.
        target_modules: the package's one meaning (:func:`lowrank_train.nn.surgery.find_target_modules`),
            matched, as PEFT's own ``LoraConfig.target_modules`` is, against the names in the wrapped base model
            (:func:`base_model_names`): ``["up_proj"]`` or ``r"model\.layers\.\d+\.mlp\..*"`` select the same
            layers here as in the model before ``get_peft_model``.

    Returns:
        The low-rank group (full-trained linear weights only) if any, and the plain group (adapters and every
        other trainable parameter).

    Raises:
        ValueError: when no trainable linear weight at all (adapter or not) matches ``target_modules``.
    """
    names = base_model_names(model)
    selected = find_target_modules(model, target_modules, match_name=names.__getitem__)
    if not any(module.weight.requires_grad for module in selected.values()):
        raise ValueError(f"no trainable linear weight matches target_modules={target_modules!r}")
    groups = lowrank_param_groups(
        model,
        rank=rank,
        update_gap=update_gap,
        scale=scale,
        projector=projector,
        target_modules=list(selected),  # qualified names: a list entry matches its own module exactly
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

    factorized = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    if not factorized:
        raise ValueError("the model has no LowRankLinear layer: compress it with lowrank_train.welore first")
    dense = list(block_modules(model, is_dense_linear))  # empty when every block linear was factorized
    if not dense and not lora_config.target_modules:
        raise ValueError("every block linear is factorized: there is no dense (N-LRC) layer left for LoRA")
    if not lora_config.target_modules:
        lora_config = dataclasses.replace(lora_config, target_modules=dense)
    peft_model = get_peft_model(model, lora_config)  # freezes every base parameter
    for module in factorized:
        for param in module.parameters():
            param.requires_grad_(True)
    return peft_model
