"""Checks that a saved optimizer state fits the optimizer it is loaded into, before anything is loaded.

A state saved from a model of another width, another rank or another optimizer used to be accepted and then fail
far away: a fused AdamW kernel writing past a moment of the wrong size corrupts the heap (issue 12 item 1).
These helpers compare every saved tensor with the shape the optimizer would create itself, and raise a
``ValueError`` naming the parameter, the entry and both shapes. They also refuse a moment, basis or accumulator
holding NaN/Inf: loaded, it wrote NaN into the weights at the next step (issue 20 item 7).

The shapes an inner optimizer keeps are not guessed from its name: a throwaway instance of the same optimizer
steps once on zeros shaped like the parameter, and its state is the reference. Any optimizer class works, its
options (``amsgrad``, bitsandbytes' 8-bit threshold, Adafactor's factoring) included; one reference is made per
distinct (shape, dtype, device, options), so a model of many same-shaped layers costs a handful of tiny steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of a tensor (tensor subclasses included), ``None`` for anything else."""
    return tuple(value.shape) if torch.is_tensor(value) else None


def check_entry(label: str, what: str, key: str, saved: Any, expected: tuple[int, ...]) -> None:
    """Raises ``ValueError`` unless ``saved`` is a tensor of shape ``expected``.

    Args:
        label: the parameter, as the message should name it (``"model.layers.0.mlp.up_proj.weight (shape ...)"``).
        what: whose state (``"GaLore state"``, ``"AdamW state"``).
        key: the entry (``"exp_avg"``).
        saved: the saved value.
        expected: the shape this optimizer needs.
    """
    got = shape_of(saved)
    if got != expected:
        found = f"shape {got}" if got is not None else f"a {type(saved).__name__}"
        raise ValueError(
            f"cannot load the optimizer state of {label}: the saved {what} entry {key!r} has {found}, this optimizer "
            f"needs shape {expected}. The checkpoint comes from another model size, rank or optimizer; load it "
            "into the optimizer that saved it, or start the optimizer state afresh"
        )


# Entries that hold NaN by design: the adaptive-refresh history marks the slots not measured yet.
_MAY_HOLD_NAN = ("similarity",)


def check_finite(label: str, what: str, saved: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming the parameter and the entry when a floating entry of ``saved`` holds NaN/Inf.

    Plain tensors and Python floats are checked; integer entries (counters, quantized codes) cannot be
    non-finite, and tensor subclasses (e.g. torchao's low-bit states) are left to their own loaders.

    Args:
        label: the parameter, as the message should name it.
        what: whose state (``"GaLore state"``, ``"AdamW state"``).
        saved: ``{key: value}``, one parameter's saved state.
    """
    for key, value in saved.items():
        if key in _MAY_HOLD_NAN:
            continue
        if isinstance(value, float):
            bad, total = int(not math.isfinite(value)), 1
        elif type(value) in (torch.Tensor, nn.Parameter) and (value.is_floating_point() or value.is_complex()):
            if value.device.type == "meta":
                continue
            total = value.numel()
            bad = total - int(torch.isfinite(value).sum())
        else:
            continue
        if bad:
            raise ValueError(
                f"cannot load the optimizer state of {label}: the saved {what} entry {key!r} holds {bad} NaN/Inf "
                f"value(s) of {total}; the next step would write them into the weights. Resume from an earlier "
                "checkpoint, or start the optimizer state afresh"
            )


def check_group_sizes(saved_groups: list[Mapping[str, Any]], groups: list[Mapping[str, Any]], what: str) -> None:
    """Raises ``ValueError`` unless the saved param groups have the same number of parameters as ``groups``."""
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"cannot load the {what} state: it has {len(saved_groups)} param groups, this optimizer has {len(groups)}"
        )
    for index, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"cannot load the {what} state: its param group {index} has {len(saved['params'])} parameters, "
                f"this optimizer's has {len(group['params'])}"
            )


class ReferenceStates:
    """State shapes a fresh optimizer creates for a parameter, found by stepping a throwaway copy once on zeros."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}

    def shapes(
        self, make: OptimizerFactory, like: torch.Tensor, options: Mapping[str, Any], name: str
    ) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors ``make([{"params": [p], **options}])`` keeps for a ``p`` shaped like ``like``.

        Args:
            make: builds the optimizer from a one-parameter group list.
            like: the parameter (or a tensor of the shape, dtype and device the optimizer will see).
            options: the group's options, as they will be after loading.
            name: cache namespace (e.g. the optimizer class), so that two factories never share entries.
        """
        layout = (tuple(like.shape), like.dtype, str(like.device), type(like).__name__)
        key = (name, *layout, repr(sorted(options.items())))
        if key not in self._cache:
            self._cache[key] = self._step_once(make, like, options)
        return self._cache[key]

    @staticmethod
    def _step_once(
        make: OptimizerFactory, like: torch.Tensor, options: Mapping[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        devices = [like.device] if like.device.type == "cuda" else []
        # The throwaway step must not move the global random streams a resumed run restores.
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            dummy = nn.Parameter(torch.zeros_like(like))
            dummy.grad = torch.zeros_like(dummy)
            optimizer = make([{**options, "params": [dummy]}])
            optimizer.step()
            state = optimizer.state.get(dummy, {})
            return {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}


def check_state_against(
    label: str, what: str, saved: Mapping[str, Any], reference: Mapping[str, tuple[int, ...]]
) -> None:
    """Every tensor entry of ``reference`` must be in ``saved`` with the same shape, and be finite (an empty
    ``saved`` is fine)."""
    if not saved:
        return  # the parameter never stepped: its state starts when it does
    # Some optimizers nest entries in their state dict (bitsandbytes: "__bnb_optimizer_quant_state__"); the
    # reference comes from the live, flat state.
    saved = {
        k: v
        for key, value in saved.items()
        for k, v in (value.items() if isinstance(value, Mapping) else [(key, value)])
    }
    for key, expected in reference.items():
        if key not in saved:
            raise ValueError(
                f"cannot load the optimizer state of {label}: the saved {what} has no {key!r} entry (it has "
                f"{sorted(saved)}), which this optimizer keeps with shape {expected}. The checkpoint comes from "
                "another optimizer or other options; start the optimizer state afresh"
            )
        check_entry(label, what, key, saved[key], expected)
    check_finite(label, what, saved)


def check_optimizer_state(
    optimizer: torch.optim.Optimizer,
    state_dict: Mapping[str, Any],
    make: OptimizerFactory,
    labels: list[str],
    references: ReferenceStates | None = None,
) -> None:
    """Checks a ``torch.optim``-style ``state_dict`` against ``optimizer`` without changing it.

    Args:
        optimizer: the optimizer it would be loaded into.
        state_dict: ``{"state": {index: {key: value}}, "param_groups": [...]}``.
        make: builds an optimizer of the same kind from param groups (for the reference shapes).
        labels: a readable name per parameter, in ``state_dict`` index order.
        references: a shared cache of reference shapes.

    Raises:
        ValueError: naming the parameter and both shapes, or the entry that holds NaN/Inf.
    """
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"not an optimizer state dict: expected 'state' and 'param_groups', got {type(state_dict)}")
    what = f"{type(optimizer).__name__} state"
    check_group_sizes(state_dict["param_groups"], optimizer.param_groups, type(optimizer).__name__)
    references = references or ReferenceStates()
    index = 0
    for group, saved_group in zip(optimizer.param_groups, state_dict["param_groups"], strict=True):
        options = {k: v for k, v in saved_group.items() if k not in ("params", "param_names")}
        for param in group["params"]:
            saved = state_dict["state"].get(index, {})
            if saved:
                reference = references.shapes(make, param, options, type(optimizer).__qualname__)
                check_state_against(labels[index], what, saved, reference)
            index += 1


# Options that fix the shapes of a GaLore state: a state saved with other values cannot be loaded.
_STRUCTURAL_OPTIONS = ("rank", "projector", "proj_bits", "proj_group_size")
_GALORE_COUNTERS = ("step", "last_refresh", "gap", "seed", "refreshes")
_LOWRANK_ONLY = ("basis", "basis_codes", "basis_scales", "grad_accum", "last_refresh", "similarity", "update_norm")


def _label(group: Mapping[str, Any], group_index: int, local: int, param: torch.Tensor) -> str:
    names = group.get("param_names")
    name = names[local] if names else f"param group {group_index} params[{local}]"
    return f"{name} (shape {tuple(param.shape)})"


def _check_galore_groups(name: str, groups: list[Mapping[str, Any]], saved_groups: list[Mapping[str, Any]]) -> None:
    from lowrank_train.optim.options import GALORE_DEFAULTS

    for index, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
        if ("rank" in group) != ("rank" in saved_group):
            kinds = ["low-rank" if "rank" in g else "plain" for g in (saved_group, group)]
            raise ValueError(
                f"cannot load into {name}: param group {index} was saved as a {kinds[0]} group and is a {kinds[1]} "
                "group here; build the optimizer from the same param groups as the run that saved it"
            )
        if "rank" not in group:
            continue
        for key in _STRUCTURAL_OPTIONS:
            saved, current = saved_group.get(key, GALORE_DEFAULTS.get(key)), group.get(key)
            if saved != current:
                raise ValueError(
                    f"cannot load into {name}: param group {index} was saved with {key}={saved!r} and has "
                    f"{key}={current!r} here; {key} fixes the shapes of the stored basis and moments, so build the "
                    f"optimizer with {key}={saved!r} or start the optimizer state afresh"
                )


def _check_lowrank_entries(
    label: str, saved: Mapping[str, Any], saved_group: Mapping[str, Any], rows: int, rank: int, projected: tuple
) -> None:
    """GaLore's own entries of one projected parameter: counters, basis (or its codes), accumulator, history."""
    from lowrank_train.optim.options import GALORE_DEFAULTS
    from lowrank_train.projection import get_projector
    from lowrank_train.quant import QuantizedTensor

    what = "GaLore state"
    if not saved:
        return
    for key in _GALORE_COUNTERS:
        check_entry(label, what, key, saved.get(key), ())
    bits = saved_group.get("proj_bits")
    if get_projector(saved_group["projector"]).stores_basis and int(saved["last_refresh"]) >= 0:
        for key in ("basis",) if bits is None else ("basis_codes", "basis_scales"):
            if key not in saved:
                raise ValueError(
                    f"cannot load the optimizer state of {label}: the saved {what} has no {key!r} entry although a "
                    f"basis was built (last_refresh {int(saved['last_refresh'])}); the checkpoint is incomplete"
                )
    if "basis" in saved:
        check_entry(label, what, "basis", saved["basis"], (rows, rank))
    if "basis_codes" in saved or "basis_scales" in saved:
        reference = QuantizedTensor.from_float(torch.zeros(rows, rank), bits, saved_group["proj_group_size"])
        check_entry(label, what, "basis_codes", saved.get("basis_codes"), tuple(reference.codes.shape))
        check_entry(label, what, "basis_scales", saved.get("basis_scales"), tuple(reference.scales.shape))
    if "grad_accum" in saved:
        check_entry(label, what, "grad_accum", saved["grad_accum"], projected)
    if "update_norm" in saved:  # the norm-growth limiter's last norm (lowrank_train.optim.update_rules)
        check_entry(label, what, "update_norm", saved["update_norm"], ())
    if "similarity" in saved:
        history = saved_group.get("refresh_history", GALORE_DEFAULTS["refresh_history"])
        check_entry(label, what, "similarity", saved["similarity"], (history,))
    check_finite(label, what, saved)


def check_galore_state(
    optimizer: Any,
    state_dict: Mapping[str, Any],
    make_base: OptimizerFactory,
    base_key: str,
    references: ReferenceStates | None = None,
) -> None:
    """Checks what :meth:`GaLore.state_dict` wrote against a :class:`~lowrank_train.optim.GaLore`, changing nothing.

    Args:
        optimizer: the GaLore optimizer it would be loaded into.
        state_dict: the saved state.
        make_base: builds the inner optimizer from param groups (for its reference shapes).
        base_key: identifies ``make_base`` (class and constructor arguments) in the ``references`` cache.
        references: a cache shared between optimizers (the layer-wise engine checks one GaLore per parameter).

    Raises:
        ValueError: a state that is not GaLore's, another group layout, other structural group options (rank,
            projector, proj_bits, proj_group_size), a tensor of the wrong shape (naming the parameter and both
            shapes), or a moment, basis or accumulator holding NaN/Inf (naming the parameter and the entry).
    """
    from lowrank_train.projection import basis_rows, get_projector

    name = type(optimizer).__name__
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"cannot load into {name}: not an optimizer state dict (no 'state' / 'param_groups')")
    if "base" not in state_dict:
        raise ValueError(
            f"cannot load this optimizer state into {name}: it has no 'base' entry, so it was not saved by a GaLore "
            "optimizer (a plain optimizer's state, e.g. torch.optim.AdamW's, holds full-size moments; GaLore's inner "
            "optimizer keeps projected r x max(m, n) ones). Load it into the optimizer that saved it, or start the "
            "optimizer state afresh"
        )
    base = optimizer.base_optimizer
    check_group_sizes(state_dict["param_groups"], optimizer.param_groups, name)
    check_group_sizes(state_dict["base"]["param_groups"], base.param_groups, f"{name} inner {type(base).__name__}")
    _check_galore_groups(name, optimizer.param_groups, state_dict["param_groups"])
    references = references or ReferenceStates()
    base_what = f"{type(base).__name__} state (GaLore's inner optimizer)"
    index = 0
    saved_groups = zip(state_dict["param_groups"], state_dict["base"]["param_groups"], strict=True)
    for group_index, (group, (saved_group, base_group)) in enumerate(
        zip(optimizer.param_groups, saved_groups, strict=True)
    ):
        base_options = {k: v for k, v in base_group.items() if k not in ("params", "param_names")}
        for local, param in enumerate(group["params"]):
            label = _label(group, group_index, local, param)
            saved = state_dict["state"].get(index, {})
            if optimizer.is_lowrank(param):
                rank = get_projector(saved_group["projector"]).basis_rank(param.shape, saved_group["rank"])
                projected = tuple(optimizer.backend.projected_shape(param, rank))
                _check_lowrank_entries(label, saved, saved_group, basis_rows(param.shape), rank, projected)
                like = torch.zeros(projected, dtype=param.dtype, device=param.device)
            else:
                stray = [key for key in _LOWRANK_ONLY if key in saved]
                if stray:
                    raise ValueError(
                        f"cannot load the optimizer state of {label}: it was saved as a projected (low-rank) "
                        f"parameter (entries {stray}) and gets the plain update here"
                    )
                like = param
            base_saved = state_dict["base"]["state"].get(index, {})
            if base_saved:
                reference = references.shapes(make_base, like, base_options, base_key)
                check_state_against(label, base_what, base_saved, reference)
            index += 1
    engine = state_dict.get("galore", {})
    if "skipped_steps" in engine:
        check_entry("the optimizer", "GaLore engine", "skipped_steps", engine["skipped_steps"], ())
