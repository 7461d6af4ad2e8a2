"""Splitting a model's parameters into a low-rank group and a plain group (the two-line AdamW replacement)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

# The linear-type registry and target_modules matching live in lowrank_train.nn.surgery (one meaning everywhere);
# LINEAR_TYPES / register_linear_type stay importable from here. Importing lowrank_train.nn registers QuantLinear.
from lowrank_train.nn.surgery import LINEAR_TYPES, find_target_modules, register_linear_type
from lowrank_train.optim.options import (
    GALORE_DEFAULTS,
    check_lowrank_group,
    check_option_names_for_any_base,
    validate_group_options,
)

__all__ = ["LINEAR_TYPES", "check_unique_params", "lowrank_param_groups", "register_linear_type"]


def _param_label(group: Mapping[str, Any], index: int) -> str:
    names = group.get("param_names")
    name = names[index] if names and index < len(names) else f"params[{index}]"
    return f"{name} (shape {tuple(group['params'][index].shape)})"


def check_unique_params(group: Mapping[str, Any], groups: Sequence[Mapping[str, Any]], where: str) -> None:
    """Raises ``ValueError`` when a parameter of the new ``group`` is in it twice or already in one of ``groups``.

    torch.optim only warns about the first and refuses the second naming no parameter; a GaLore low-rank group
    holding a weight twice then failed at the first step with ``size mismatch ... vec (0)`` (issue 20).

    Args:
        group: the group being added, its ``params`` a list (``param_names`` optional).
        groups: the groups already added.
        where: what the message starts with (``"GaLoreAdamW param group 1"``).
    """
    first: dict[int, str] = {}
    for group_index, other in enumerate(groups):
        for index, param in enumerate(other["params"]):
            first.setdefault(id(param), f"in param group {group_index} as {_param_label(other, index)}")
    params = list(group["params"])
    for index, param in enumerate(params):
        label = _param_label({**group, "params": params}, index)
        if id(param) in first:
            raise ValueError(
                f"{where}: {label} is also {first[id(param)]}; a parameter may appear once, in one group (it "
                "gets one update per step): remove the repeat"
            )
        first[id(param)] = f"earlier in this group as {label}"


def lowrank_param_groups(
    model: nn.Module,
    rank: int,
    update_gap: int = 200,
    scale: float = 0.25,
    projector: str = "svd",
    target_modules: str | Sequence[str] | None = "all-linear",
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for a GaLore optimizer: projected linear weights, and everything else.

    Args:
        model: any module tree.
        rank: projection rank of the low-rank group.
        update_gap: steps between basis refreshes.
        scale: GaLore's alpha.
        projector: registered projector name ("svd", "rsvd", "random").
        target_modules: which linear layers (registered types, :data:`LINEAR_TYPES`) are projected, with the
            package's one meaning (:func:`lowrank_train.nn.surgery.find_target_modules`): "all-linear" (every
            linear layer except the output head and weights tied to it), a list of module names or dotted name
            suffixes (``["q_proj", "v_proj"]``), a regular expression fully matching the qualified module name,
            or ``None`` (the linear layers inside the repeated blocks).
        **group_options: extra keys for the low-rank group (e.g. ``proj_bits``, ``lr``).

    Returns:
        Up to two groups: ``{"params", "param_names", "rank", "update_gap", "scale", "projector", ...}`` and
        ``{"params", "param_names"}`` (embeddings, norms, biases, the head). Empty groups are left out.

    Raises:
        ValueError: when no linear weight matches ``target_modules``; for an unknown option (listing the known
            ones, with a did-you-mean) or a value out of range (:mod:`lowrank_train.optim.options`).
    """
    # Validated here, at the first call, not only when the optimizer is built (issue 15 item 1).
    where = "lowrank_param_groups"
    check_option_names_for_any_base(group_options, where=where)
    options = {"rank": rank, "update_gap": update_gap, "scale": scale, "projector": projector, **group_options}
    options = validate_group_options(options, where=where)
    check_lowrank_group({**GALORE_DEFAULTS, **options}, where=where)
    selected = find_target_modules(model, target_modules).values()
    chosen = {id(module.weight) for module in selected if module.weight.requires_grad}
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
    lowrank.update(options)
    return [g for g in (lowrank, plain) if g["params"]]
