"""Low-bit Adam moments for the parameters a projecting method does not project (embeddings, head, norms).

At 7B with APOLLO-Mini the projected states are a few MB, while the 32000 x 4096 embedding and head keep full-size
AdamW moments (~1 GB in fp32); 8-bit (bitsandbytes' blockwise) or 4-bit (torchao) moments for them are the
largest saving left (issue 21 item 3). ``optimizer.dense_state_bits`` picks an entry of this registry:

======  =====================================  =============================================
bits    inner optimizer of the dense groups    bytes per moment element (+ block scales)
======  =====================================  =============================================
32      ``torch.optim.AdamW`` (fused)          the parameter's dtype
8       bitsandbytes ``AdamW8bit``             1 (+ one fp32 absmax per 256)
4       torchao ``AdamW4bit``                  0.5 (+ one fp32 scale per 128)
======  =====================================  =============================================

How the dense groups reach their optimizer:

* layer-wise (:class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer`): every parameter has its own inner
  optimizer, so :func:`dense_split_factory` routes a group with ``rank`` to the method and one without to the
  dense entry;
* otherwise :class:`DenseSplitOptimizer` holds the method over the low-rank groups and the dense optimizer over the
  rest, and steps them as one optimizer (one non-finite decision, one state dict, the groups of both for LR
  schedulers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowrank_train._registry import Registry
from lowrank_train.optim.bases import resolve_base
from lowrank_train.optim.functional import finite_flags
from lowrank_train.optim.state_checks import check_group_sizes
from lowrank_train.quant import MOMENT_BITS, check_bits

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
_NONFINITE = ("raise", "skip")
_SHOWN_NAMES = 6


@dataclass(frozen=True)
class DenseStates:
    """One choice of moments for the dense (non-projected) param groups.

    Attributes:
        name: the registered base optimizer it builds (:data:`lowrank_train.optim.BASE_OPTIMIZERS`).
        bits: bits per moment element, one of :data:`lowrank_train.quant.MOMENT_BITS`; ``dense_state_bits`` looks
            the entry up by it.
        description: one line for messages.
        fused: pass ``fused=True`` when every parameter is a CPU/CUDA float tensor (torch's AdamW kernel).
    """

    name: str
    bits: int
    description: str
    fused: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits, MOMENT_BITS, name=f"dense states {self.name!r}: bits", optional=False)

    def build(self, groups: list[dict[str, Any]], **hyperparameters: Any) -> torch.optim.Optimizer:
        """The inner optimizer over ``groups`` (``lr``, ``weight_decay``, ``betas``, ``eps``); imports it here."""
        kwargs = dict(hyperparameters)
        tensors = [p for g in groups for p in g["params"]]
        if self.fused and tensors and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors):
            kwargs.setdefault("fused", True)
        return resolve_base(self.name)([_plain_group(g) for g in groups], **kwargs)


def _plain_group(group: Mapping[str, Any]) -> dict[str, Any]:
    # A base optimizer keeps unknown keys, but only params and the hyperparameters mean anything to it.
    return {k: v for k, v in group.items() if k in ("params", "param_names", "lr", "weight_decay", "betas", "eps")}


_REGISTRY: Registry[DenseStates] = Registry("dense-state optimizer", DenseStates)
for _entry in (
    DenseStates("adamw", 32, "torch AdamW, moments in the parameter dtype", fused=True),
    DenseStates("adamw8bit", 8, "bitsandbytes' blockwise 8-bit AdamW"),
    DenseStates("adamw4bit", 4, "torchao's 4-bit AdamW"),
):
    _REGISTRY.add(_entry)


def register_dense_states(entry: DenseStates, *, replace: bool = False) -> DenseStates:
    """Adds a dense-state choice (its ``bits`` must not be taken by another entry unless ``replace``)."""
    taken = [e for e in _REGISTRY.values() if e.bits == entry.bits and e.name != entry.name]
    if taken and not replace:
        raise ValueError(f"dense_state_bits={entry.bits} is already served by {taken[0].name!r}")
    for other in taken:
        del _REGISTRY[other.name]
    return _REGISTRY.add(entry, replace=replace)


def dense_states(bits: int) -> DenseStates:
    """The entry for ``dense_state_bits=bits``.

    Raises:
        ValueError: ``bits`` is not one of :data:`~lowrank_train.quant.MOMENT_BITS`, or no entry has it.
    """
    bits = check_bits(bits, MOMENT_BITS, name="dense_state_bits", optional=False)
    for entry in _REGISTRY.values():
        if entry.bits == bits:
            return entry
    raise ValueError(f"no dense-state optimizer is registered for dense_state_bits={bits}")


def is_dense_group(group: Mapping[str, Any]) -> bool:
    """A group without ``rank``: its parameters get the plain base update (no projection)."""
    return "rank" not in group


def dense_split_factory(method: OptimizerFactory, dense: OptimizerFactory) -> OptimizerFactory:
    """A factory for :class:`~lowrank_train.optim.layerwise.LayerwiseOptimizer`: ``method`` for low-rank groups,
    ``dense`` for the others (the engine passes one group at a time)."""

    def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return dense(groups) if all(is_dense_group(g) for g in groups) else method(groups)

    return build


class DenseSplitOptimizer(torch.optim.Optimizer):
    """A projecting optimizer over the low-rank groups and a dense one over the rest, stepped as one.

    :attr:`param_groups` are the two parts' own group dicts (low-rank first), so an LR scheduler writing ``lr``
    reaches both. A step first checks the dense gradients for NaN/Inf (one host synchronisation), then steps the
    projecting part (which checks its own), and the dense part only when the projecting part did not skip: a step
    is applied or skipped as a whole.

    Args:
        projected: the method's optimizer (GaLore family) over the low-rank groups; may be ``None`` when there are
            none.
        dense: the optimizer over the dense groups.
        nonfinite: "raise" (a ``ValueError`` naming the parameters, nothing stepped) or "skip" (count it in
            :attr:`skipped_steps`) for a NaN/Inf dense gradient.

    State dict: ``{"parts": [projected, dense], "split": {"skipped_steps": int64 tensor}}``.
    """

    def __init__(
        self, projected: torch.optim.Optimizer | None, dense: torch.optim.Optimizer, *, nonfinite: str = "raise"
    ):
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        self._parts = tuple(p for p in (projected, dense) if p is not None)
        self._projected = projected
        self._dense = dense
        self.nonfinite = nonfinite
        self._skipped = torch.zeros((), dtype=torch.int64)
        groups = [g for part in self._parts for g in part.param_groups]
        super().__init__(groups, {})
        self.param_groups = groups  # the parts' own dicts (Optimizer.__init__ may have copied them)

    @property
    def parts(self) -> tuple[torch.optim.Optimizer, ...]:
        """The projecting optimizer (when there is one) and the dense one."""
        return self._parts

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a NaN/Inf gradient, by either part."""
        inner = int(getattr(self._projected, "skipped_steps", 0)) if self._projected is not None else 0
        return int(self._skipped) + inner

    def is_lowrank(self, param: torch.Tensor) -> bool:
        """True when the projecting part updates ``param`` through a projection."""
        check = getattr(self._projected, "is_lowrank", None)
        return bool(check(param)) if check is not None else False

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of both parts (see the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        named = [
            (g.get("param_names"), i, p)
            for g in self._dense.param_groups
            for i, p in enumerate(g["params"])
            if p.grad is not None
        ]
        if named:
            flags = finite_flags([p.grad for _, _, p in named])
            if not bool(flags.all()):
                flags = flags.tolist()
                bad = [
                    names[i] if names else f"params[{i}]"
                    for (names, i, _), ok in zip(named, flags, strict=True)
                    if not ok
                ]
                if self.nonfinite == "raise":
                    more = len(bad) - _SHOWN_NAMES
                    shown = ", ".join(bad[:_SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")
                    raise ValueError(
                        f"non-finite gradient (NaN/Inf) in {shown}; nothing was stepped. Lower the learning rate, "
                        "or pass nonfinite='skip' to skip such steps"
                    )
                self._skipped += 1
                return loss
        if self._projected is not None:
            before = int(getattr(self._projected, "skipped_steps", 0))
            self._projected.step()
            if int(getattr(self._projected, "skipped_steps", 0)) != before:
                return loss  # the projecting part skipped: so does the dense one
        self._dense.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self._parts:
            part.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        parts = [part.state_dict() for part in self._parts]
        return {"parts": parts, "split": {"skipped_steps": self._skipped.clone()}}

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raises ``ValueError`` when ``state_dict`` was not written by an optimizer of this layout."""
        parts = state_dict.get("parts") if isinstance(state_dict, Mapping) else None
        if not isinstance(parts, Sequence) or len(parts) != len(self._parts):
            raise ValueError(
                f"cannot load the optimizer state: this optimizer has {len(self._parts)} parts (projected and dense "
                "groups apart, optimizer.dense_state_bits), the saved state does not; resume with the "
                "optimizer.dense_state_bits it was written with"
            )
        for part, saved in zip(self._parts, parts, strict=True):
            check = getattr(part, "check_state_dict", None)
            if check is not None:
                check(saved)
            else:
                check_group_sizes(saved["param_groups"], part.param_groups, f"dense ({type(part).__name__})")

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.check_state_dict(state_dict)
        for part, saved in zip(self._parts, state_dict["parts"], strict=True):
            part.load_state_dict(saved)
        # Optimizer.load_state_dict of a part replaces its group dicts: take the new ones.
        self.param_groups = [g for part in self._parts for g in part.param_groups]
        saved = state_dict.get("split", {}).get("skipped_steps", 0)
        self._skipped = torch.as_tensor(saved, dtype=torch.int64).cpu().clone()

    def __repr__(self) -> str:
        return f"DenseSplitOptimizer({', '.join(type(p).__name__ for p in self._parts)})"


__all__ = [
    "DenseSplitOptimizer",
    "DenseStates",
    "dense_split_factory",
    "dense_states",
    "is_dense_group",
    "register_dense_states",
]
