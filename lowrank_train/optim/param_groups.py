"""Splitting a model's parameters into a low-rank group and a plain group (the two-line AdamW replacement)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from lowrank_train.nn.quant_linear import QuantLinear

# Module types whose 2-D ``weight`` can be projected; other packages register theirs.
LINEAR_TYPES: list[type[nn.Module]] = [nn.Linear, QuantLinear]


def register_linear_type(module_type: type[nn.Module]) -> None:
    """Lets :func:`lowrank_param_groups` treat ``module_type``'s 2-D ``weight`` like an ``nn.Linear`` weight."""
    if module_type not in LINEAR_TYPES:
        LINEAR_TYPES.append(module_type)


def _output_head_ids(model: nn.Module) -> set[int]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {id(head)} if head is not None else set()


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lowrank_param_groups(
    model: nn.Module,
    rank: int,
    update_gap: int = 200,
    scale: float = 0.25,
    projector: str = "svd",
    target_modules: str | Sequence[str] = "all-linear",
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for a GaLore optimizer: projected linear weights, and everything else.

    Args:
        model: any module tree.
        rank: projection rank of the low-rank group.
        update_gap: steps between basis refreshes.
        scale: GaLore's alpha.
        projector: registered projector name ("svd", "rsvd", "random").
        target_modules: "all-linear" (every linear layer except the output head, and except weights tied to
            it), a list of module names or name suffixes (``["q_proj", "v_proj"]``), or a regular expression
            matched against the full module name.
        **group_options: extra keys for the low-rank group (e.g. ``proj_bits``, ``lr``).

    Returns:
        Up to two groups: ``{"params", "param_names", "rank", "update_gap", "scale", "projector", ...}`` and
        ``{"params", "param_names"}`` (embeddings, norms, biases, the head). Empty groups are left out.

    Raises:
        ValueError: when no linear weight matches ``target_modules``.
    """
    head_ids = _output_head_ids(model)
    head_weights = {id(m.weight) for m in model.modules() if id(m) in head_ids and hasattr(m, "weight")}
    chosen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, tuple(LINEAR_TYPES)) or id(module) in head_ids:
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or not weight.requires_grad or id(weight) in head_weights:
            continue
        if target_modules == "all-linear" or _matches(name, target_modules):
            chosen.add(id(weight))
    if not chosen:
        raise ValueError(f"no trainable linear weight matches target_modules={target_modules!r}")
    lowrank: dict[str, Any] = {"params": [], "param_names": []}
    plain: dict[str, Any] = {"params": [], "param_names": []}
    for name, param in model.named_parameters():  # named_parameters de-duplicates tied weights
        if not param.requires_grad:
            continue
        group = lowrank if id(param) in chosen else plain
        group["params"].append(param)
        group["param_names"].append(name)
    lowrank.update(rank=rank, update_gap=update_gap, scale=scale, projector=projector, **group_options)
    return [g for g in (lowrank, plain) if g["params"]]
