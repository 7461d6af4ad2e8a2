"""GaLore: run any elementwise optimizer on low-rank projections of 2-D weight gradients.

The inner ("base") optimizer never sees a full weight. For each low-rank weight W (m x n) it owns a
*shadow* parameter of the projected shape (r x max(m, n)); each step the shadow is set to zero, given the
projected gradient as its ``.grad``, and stepped, so its new value is exactly the base optimizer's update.
That update is projected back and added to W. Shadows hold no memory between steps (their storage is
released), so any optimizer class works unchanged: ``torch.optim.AdamW``, bitsandbytes' ``AdamW8bit``,
transformers' ``Adafactor``, ... A base known to update each parameter alone
(:data:`~lowrank_train.optim.bases.PER_PARAMETER_BASES`) takes one step for the plain weights and then one per run of
projected weights whose shadows together fit in the largest weight's size, so the shadows' storage does not grow
with depth; any other base takes one step for all.

Per-parameter state in ``optimizer.state[p]`` (all tensors; integers on the CPU so that reading them
never synchronises a GPU):

=================  ======================================================================
``step``           int64, steps this parameter has taken
``last_refresh``   int64, step of the last basis refresh (-1 before the first)
``gap``            int64, steps between refreshes (fixed here, adapted by Q-GaLore)
``seed``           int64, seeds randomized and random projectors
``refreshes``      int64, number of refreshes so far
``basis``          fp32 (min(m, n) x r) orthonormal basis, absent for "random" and "identity" and
                   when ``proj_bits`` is set
``basis_codes``    with ``proj_bits`` 8: int8 codes; 4: uint8, two codes per byte (Q-GaLore)
``basis_scales``   with ``proj_bits``: fp32 per-group scales of the basis codes
``similarity``     with ``adaptive_refresh``: fp32 (refresh_history,) last subspace overlaps, NaN
                   where not measured yet (on the CPU)
``grad_accum``     between :meth:`GaLore.accumulate_grad` and the next step: the (r x max(m, n))
                   projected gradient sum (:meth:`GaLore.projected_accumulator`); dropped by
                   ``zero_grad()``, by a skipped step and by :meth:`GaLore.drop_accumulation`
``update_norm``    with a norm-growth limiter: fp32 0-dim on the parameter's device, the last limited
                   ``||update|| / lr`` (:mod:`lowrank_train.optim.update_rules`)
=================  ======================================================================

Non-finite gradients (issue 12 item 4): every step checks every gradient it would apply (low-rank and plain
groups, projected accumulators included) with one host synchronisation, before anything changes. A low-rank
weight between refreshes is checked through its projection, which the step then reuses (one pass over G, not
two). The ``nonfinite`` constructor option decides: "raise" (default) refuses with a ``ValueError`` naming the
parameters; "skip" skips the whole step and counts it in :attr:`GaLore.skipped_steps`. A caller that checks the
gradients itself passes ``check_finite=False`` to :meth:`GaLore.step` and :meth:`GaLore.accumulate_grad`, so each
gradient is checked once (issue 19 item 3).

The layer-wise engine (:mod:`lowrank_train.optim.layerwise`) drives GaLore through public methods only:
:meth:`GaLore.is_lowrank`, :meth:`GaLore.accumulates_projected`, :meth:`GaLore.refresh_due`,
:meth:`GaLore.accumulate_grad`, :meth:`GaLore.projected_accumulator`, :meth:`GaLore.drop_accumulation` and
:meth:`GaLore.step`.

Layout: what differs when a weight is split over processes (projecting a shard, building the basis from the
full gradient, writing back a shard, agreeing on the finiteness flags) goes through a
:class:`~lowrank_train.optim.backend.ProjectionBackend`; :class:`~lowrank_train.integrations.fsdp.FSDP2GaLore`
supplies the one for FSDP2.

Q-GaLore (Zhang et al. 2024, arXiv 2407.08296; issue 3) is three group options on the same wrapper:
``proj_bits`` (4 or 8: the basis is kept as group-wise quantized codes, ``proj_group_size`` per group),
``adaptive_refresh`` (the gap grows by ``refresh_growth`` up to ``max_update_gap`` while the mean overlap of the
last ``refresh_history`` refreshes is at least ``refresh_threshold``, and shrinks back when it drops; see
:mod:`lowrank_train.projection.adaptive`), and INT8 weights (:func:`lowrank_train.nn.quantize_model`), which
:func:`apply_weight_update` writes back with stochastic rounding.

The base optimizer's own state (e.g. ``exp_avg`` of shape r x max(m, n)) is saved under the ``"base"`` key
of :meth:`GaLore.state_dict`, the skip count under ``"galore"``; :meth:`GaLore.load_state_dict` checks every
saved tensor's shape first (:mod:`lowrank_train.optim.state_checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lowrank_train.nn.autocast import autocast_disabled_on
from lowrank_train.nn.quant_linear import is_quantized_weight
from lowrank_train.optim.backend import DenseBackend, ProjectionBackend, is_dtensor
from lowrank_train.optim.bases import resolve_base, steps_each_parameter_alone
from lowrank_train.optim.functional import basis_generator, refresh_due, rounding_generator
from lowrank_train.optim.options import (
    GALORE_DEFAULTS,
    PROJ_DTYPES,
    base_option_names,
    check_lowrank_group,
    check_option_names,
    max_update_gap,
    options_doc,
    validate_group_options,
)
from lowrank_train.optim.param_groups import check_unique_params
from lowrank_train.optim.state_checks import ReferenceStates, check_galore_state
from lowrank_train.optim.update_rules import get_update_rule
from lowrank_train.projection import (
    basis_rows,
    get_projector,
    next_refresh_gap,
    orient,
    push_similarity,
    subspace_overlap,
)
from lowrank_train.quant import QuantizedTensor

NONFINITE_POLICIES = ("raise", "skip")
_SHOWN_NAMES = 6  # parameters named in a non-finite message before "and N more"
_INT_STATE = ("step", "last_refresh", "gap", "seed", "refreshes")
_CPU_STATE = (*_INT_STATE, "similarity")  # read by Python at every refresh: kept off the GPU


def _param_label(group: dict[str, Any], index: int, param: torch.Tensor) -> str:
    names = group.get("param_names")
    name = names[index] if names and index < len(names) else f"params[{index}]"
    return f"{name} (shape {tuple(param.shape)})"


def _check_lowrank_params(group: dict[str, Any], where: str, optimizer_name: str) -> None:
    """Every parameter of a low-rank group must be 2-D, with ``rank`` below min(m, n) unless it may fall back."""
    full_rank = get_projector(group["projector"]).full_rank
    for i, p in enumerate(group["params"]):
        label = _param_label(group, i, p)
        if p.dim() != 2:
            raise ValueError(
                f"{where}: low-rank groups take only 2-D weights; {label} is {p.dim()}-D: move it to a group "
                "without 'rank'"
            )
        if not full_rank and group["rank"] >= min(p.shape) and not group["full_rank_fallback"]:
            raise ValueError(
                f"{where}: rank {group['rank']} is not below min(m, n) = {min(p.shape)} for {label}: a low-rank "
                "projection would save nothing. Lower the rank, or give such weights the plain update with "
                f"full_rank_fallback=True (a keyword of lowrank_param_groups and of {optimizer_name}, or a "
                "param-group key)"
            )


class GaLore(torch.optim.Optimizer):
    """Gradient low-rank projection around any elementwise optimizer (Zhao et al. 2024, arXiv 2403.03507).

    Groups with a ``rank`` key are low-rank: each 2-D gradient is projected on its smaller side, the base
    optimizer runs on the projection, the update is projected back and scaled by ``scale``. Groups without
    ``rank`` get the plain base update.

    Args:
        params: parameters or param groups, typically from :func:`lowrank_param_groups`.
        base: optimizer class (``torch.optim.AdamW``, ``bitsandbytes.optim.AdamW8bit``, ...) or a registered
            name ("adamw", "adamw8bit", "adafactor", "adam", "sgd").
        nonfinite: what a step does when a gradient holds NaN/Inf (checked for every parameter, with one host
            synchronisation per step): "raise" (default) refuses the step with a ``ValueError`` before anything
            changes; "skip" skips the whole step (no weight, moment, basis or counter changes; the gradients are
            left for ``zero_grad()``) and counts it in :attr:`skipped_steps`.
        backend: the layout-dependent operations (:class:`~lowrank_train.optim.backend.ProjectionBackend`);
            ``None`` for ordinary tensors. :class:`~lowrank_train.integrations.fsdp.FSDP2GaLore` passes the one
            for FSDP2 shards.
        **defaults: base optimizer keyword arguments (``lr``, ``betas``, ``weight_decay``...) and GaLore
            group options (listed below), the defaults of every group.

    Raises:
        ValueError: an unknown option or group key (the message lists the known ones), a value out of range,
            a weight the group cannot project (see :meth:`add_param_group`).

    Example:
        >>> groups = lowrank_param_groups(model, rank=128, update_gap=200, scale=0.25)
        >>> opt = GaLore(groups, base=torch.optim.AdamW, lr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[Any],
        base: type[torch.optim.Optimizer] | str = "adamw",
        *,
        nonfinite: str = "raise",
        backend: ProjectionBackend | None = None,
        **defaults: Any,
    ):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self._skipped_steps = torch.zeros((), dtype=torch.int64)  # a CPU tensor: saved in state_dict
        self._poisoned: list[str] = []  # nonfinite="skip": parameters whose micro-batch spoiled the pending step
        self._base_cls = resolve_base(base)
        self._one_at_a_time = steps_each_parameter_alone(self._base_cls)
        self._name = type(self).__name__  # errors name the class the user called (GaLoreAdamW, ...)
        self._base_names = base_option_names(self._base_cls)
        if "rank" in defaults:
            raise ValueError("pass rank in a param group (see lowrank_param_groups), not as an optimizer default")
        check_option_names(defaults, where=self._name, base_names=self._base_names)
        defaults = validate_group_options(defaults, where=self._name)
        if backend is None:
            backend = DenseBackend()
        if not isinstance(backend, ProjectionBackend):
            raise ValueError(f"backend must implement lowrank_train.optim.backend.ProjectionBackend, got {backend!r}")
        self.backend = backend
        galore_defaults = {k: defaults.pop(k, v) for k, v in GALORE_DEFAULTS.items()}
        self._base_kwargs = defaults
        self._shadows: dict[torch.Tensor, nn.Parameter] = {}
        # A seeded (random) basis between refreshes: (seed, last refresh) -> basis, so it is drawn once per refresh
        # instead of every step (issue 21 item 4). Not state: rebuilt from the seed after a resume.
        self._seeded_bases: dict[torch.Tensor, tuple[tuple[int, int], torch.Tensor]] = {}
        self._base: torch.optim.Optimizer | None = None
        super().__init__(params, {**galore_defaults, **defaults})
        self._base = self._base_cls([self._base_group(g) for g in self.param_groups], **defaults)
        for group in self.param_groups:  # our groups carry the base's defaults so schedulers see lr & co.
            for key, value in self._base.defaults.items():
                group.setdefault(key, value)

    # ----- groups -------------------------------------------------------------------------------
    def is_lowrank(self, param: torch.Tensor) -> bool:
        """True when ``param`` is updated through a projection (not a plain or full-rank-fallback param)."""
        return param in self._shadows

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group after checking its keys and values (see :mod:`lowrank_train.optim.options`).

        Raises:
            ValueError: an unknown key (with the known ones and a did-you-mean), a value out of range, a
                non-2-D weight or a rank not below min(m, n) in a low-rank group, an unsupported parameter, a
                parameter listed twice or already in another group.
        """
        where = f"{self._name} param group {len(self.param_groups)}"
        if not isinstance(param_group, dict):
            raise ValueError(f"{where}: a param group must be a dict, got {type(param_group).__name__}")
        check_option_names(param_group, where=where, base_names=self._base_names, kind="key")
        checked = validate_group_options(param_group, where=where)
        if not isinstance(checked["params"], set):  # torch refuses sets (unordered) itself
            params = checked["params"]
            checked["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            check_unique_params(checked, self.param_groups, where)
        # Every check runs on the group as it will be (defaults filled in) before anything is added.
        merged = {**self.defaults, **checked}
        projected = []
        if "rank" in merged:
            check_lowrank_group(merged, where=where)
            _check_lowrank_params(merged, where, self._name)
            rule = get_update_rule(merged["update"])
            if not rule.sharded and any(is_dtensor(p) for p in merged["params"]):
                raise ValueError(
                    f"{where}: update={merged['update']!r} does not take the cross-process sums a sharded (FSDP2) "
                    "weight needs (UpdateRule.sharded is False); use a rule that does ('galore', 'apollo', 'fira')"
                )
            full_rank = get_projector(merged["projector"]).full_rank
            for i, p in enumerate(merged["params"]):
                self.backend.check_param(p, _param_label(merged, i, p))
                if full_rank or merged["rank"] < min(p.shape):
                    projected.append(p)
        for i, p in enumerate(merged["params"]):
            if is_quantized_weight(p) and not any(p is q for q in projected):
                raise ValueError(
                    f"{where}: {_param_label(merged, i, p)} is an INT8 quantized weight: it can only be written by "
                    "this optimizer's stochastic-rounding write-back, so it needs a low-rank group (rank below "
                    "min(m, n), or projector='identity' for a full-rank update)"
                )
        super().add_param_group(checked)
        group = self.param_groups[-1]
        for p in projected:
            self._shadows[p] = nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device))
        if self._base is not None:
            self._base.add_param_group(self._base_group(group))

    def _base_group(self, group: dict[str, Any]) -> dict[str, Any]:
        params = [self._shadows.get(p, p) for p in group["params"]]
        return {"params": params, **{k: group[k] for k in self._base_kwargs if k in group}}

    def _sync_base_groups(self) -> None:
        # Hyperparameters live in our groups (schedulers write there); copy them to the base each step.
        # A shadow is zero when stepped, so the base's own weight decay is a no-op on it; the decay of a
        # low-rank weight is applied to the full weight in apply_weight_update.
        for group, base_group in zip(self.param_groups, self._base.param_groups, strict=True):
            for key in self._base.defaults:
                if key not in group:
                    continue
                current = base_group.get(key)
                if torch.is_tensor(current) and not torch.is_tensor(group[key]):
                    current.fill_(group[key])  # e.g. torchao's low-bit optimizers keep lr as a tensor
                else:
                    base_group[key] = group[key]

    # ----- state --------------------------------------------------------------------------------
    def _init_state(self, param: torch.Tensor, group: dict[str, Any], index: int) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0, dtype=torch.int64)
            state["last_refresh"] = torch.tensor(-1, dtype=torch.int64)
            state["gap"] = torch.tensor(group["update_gap"], dtype=torch.int64)
            seed = group["proj_seed"] * 1_000_003 + group["seed_offset"] + index
            state["seed"] = torch.tensor(seed, dtype=torch.int64)
            state["refreshes"] = torch.tensor(0, dtype=torch.int64)
            if group.get("adaptive_refresh"):
                state["similarity"] = torch.full((group["refresh_history"],), float("nan"))
        return state

    def _lowrank_params(self) -> list[tuple[torch.Tensor, dict[str, Any], int]]:
        """(param, group, global index) for every low-rank parameter with a gradient or an accumulator."""
        found, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if self.is_lowrank(p) and (p.grad is not None or "grad_accum" in self.state.get(p, {})):
                    found.append((p, group, index))
                index += 1
        return found

    def _locate(self, param: torch.Tensor) -> tuple[dict[str, Any], int, str]:
        """(group, global index, readable label) of ``param``."""
        index = 0
        for group in self.param_groups:
            for local, p in enumerate(group["params"]):
                if p is param:
                    return group, index, _param_label(group, local, p)
                index += 1
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not managed by this optimizer")

    def _checked_gradients(
        self,
    ) -> tuple[list[tuple[Callable[[], str], torch.Tensor]], dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        """What the step's NaN/Inf check reads, and what it prepared for the step on the way.

        Returns (label maker, tensor) for every gradient the step would apply (each ``.grad`` and projected
        accumulator), and {param: (basis, projected gradient)} for the low-rank weights between refreshes whose
        projection every process shares (``backend.projection_is_shared``): those are checked through their
        projection R = P^T G, which the step needs anyway, instead of a second pass over the full G. Any NaN/Inf
        entry of G reaches R (NaN * x and Inf * 0 are NaN), and a projection that overflows is refused too.
        Labels are only formatted for an error.
        """
        found, prepared = [], {}
        for group in self.param_groups:
            for local, p in enumerate(group["params"]):
                state = self.state.get(p)
                accum = state.get("grad_accum") if state else None
                grad = p.grad
                between_refreshes = state and self.is_lowrank(p) and not self.refresh_due(p)
                if grad is not None and between_refreshes and self.backend.projection_is_shared(p):
                    basis = self._basis(p, group, state)  # no refresh: reads the stored or seeded basis only
                    grad = self._project(grad, basis, group)
                    prepared[p] = (basis, grad)
                for tensor, where in ((grad, ""), (accum, " (its projected accumulator)")):
                    if tensor is not None:
                        found.append((lambda g=group, i=local, q=p, w=where: _param_label(g, i, q) + w, tensor))
        return found, prepared

    def _nonfinite(self, gradients: list[tuple[Callable[[], str], torch.Tensor]]) -> list[str]:
        """Labels of the non-finite tensors among ``gradients``: one host synchronisation for all of them."""
        if not gradients:
            return []
        finite = self.backend.finite_flags([g for _, g in gradients]).cpu()
        if bool(finite.all()):
            return []
        return [label() for (label, _), ok in zip(gradients, finite.tolist(), strict=True) if not ok]

    def _refuse_or_skip(self, bad: list[str], where: str) -> None:
        """Applies the non-finite policy to a step (or micro-batch) whose gradients ``bad`` hold NaN/Inf."""
        shown = ", ".join(bad[:_SHOWN_NAMES]) + (
            f" and {len(bad) - _SHOWN_NAMES} more" if len(bad) > _SHOWN_NAMES else ""
        )
        if self.nonfinite == "raise":
            raise ValueError(
                f"non-finite gradient (NaN/Inf) in {shown}: {where} was refused and nothing was applied (no weight, "
                "moment, projection basis or step counter changed; the gradients are still in .grad, zero_grad() "
                "drops them). Look for the cause (learning rate, loss scale, a bad batch), or build the optimizer "
                "with nonfinite='skip' to skip such steps and count them in optimizer.skipped_steps"
            )
        self._poisoned.extend(bad)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN/Inf (``nonfinite="skip"``); saved in :meth:`state_dict`."""
        return int(self._skipped_steps)

    def _basis(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The basis this process uses for ``param`` (see ``ProjectionBackend.local_basis``), refreshed when due."""
        kind = get_projector(group["projector"])
        step, last = int(state["step"]), int(state["last_refresh"])
        rank = kind.basis_rank(param.shape, group["rank"])
        seed = int(state["seed"])

        def build(matrix: torch.Tensor) -> torch.Tensor:
            oriented = orient(matrix)
            generator = basis_generator(seed, last, oriented.device)
            return kind.build(oriented, rank, generator, **kind.build_options(group))

        # Seeded projectors read only the shape and device of the full weight: a stride-0 view, no values.
        shape_only = torch.zeros((), device=param.device).expand(param.shape)
        if refresh_due(step, last, int(state["gap"])):
            last = step
            if kind.stores_basis:
                basis = self.backend.build_basis(param, build) if kind.uses_gradient else build(shape_only)
                if group["adaptive_refresh"] and ("basis" in state or "basis_codes" in state):
                    self._adapt_gap(state, group, self._load_basis(state, group, param), basis)
                self._store_basis(state, basis, group)
            state["last_refresh"].fill_(last)
            state["refreshes"].add_(1)
        if kind.stores_basis:
            full = self._load_basis(state, group, param)
        elif kind.full_rank:  # the identity: min(m, n)^2 to keep, cheaper to rebuild
            full = build(shape_only)
        else:
            key = (seed, last)
            cached = self._seeded_bases.get(param)
            if cached is None or cached[0] != key:
                cached = (key, build(shape_only))
                self._seeded_bases[param] = cached
            full = cached[1]
        return self.backend.local_basis(full, param)

    def _adapt_gap(
        self, state: dict[str, torch.Tensor], group: dict[str, Any], old: torch.Tensor, new: torch.Tensor
    ) -> None:
        """Records how far the subspace moved and adapts the refresh gap (Q-GaLore Sec. 3.4, issue 3 part 3)."""
        # One device sync per refresh (the SVD that precedes it already synchronises).
        state["similarity"] = push_similarity(state["similarity"], float(subspace_overlap(old, new)))
        gap = next_refresh_gap(
            state["similarity"],
            int(state["gap"]),
            base_gap=group["update_gap"],
            max_gap=max_update_gap(group),
            threshold=group["refresh_threshold"],
            growth=group["refresh_growth"],
        )
        state["gap"].fill_(gap)

    def _store_basis(self, state: dict[str, torch.Tensor], basis: torch.Tensor, group: dict[str, Any]) -> None:
        if group["proj_bits"] is None:
            state["basis"] = basis
            return
        # Q-GaLore stores the basis as group-wise INT4/INT8 codes (round to nearest) and dequantizes on use.
        quantized = QuantizedTensor.from_float(basis, group["proj_bits"], group["proj_group_size"])
        state["basis_codes"], state["basis_scales"] = quantized.codes, quantized.scales

    def _load_basis(self, state: dict[str, torch.Tensor], group: dict[str, Any], param: torch.Tensor) -> torch.Tensor:
        if "basis" in state:
            return state["basis"]
        shape = (basis_rows(param.shape), group["rank"])
        quantized = QuantizedTensor(
            state["basis_codes"], state["basis_scales"], shape, group["proj_bits"], group["proj_group_size"]
        )
        return quantized.dequantize(torch.float32)

    # ----- step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *, check_finite: bool = True) -> float | None:
        """Performs one optimization step (the base optimizer's step, in the projected space).

        Args:
            closure: re-evaluates the model and returns the loss, as in ``torch.optim``.
            check_finite: ``False`` when the caller has checked every gradient this step applies already (the
                layer-wise engine does, after averaging over the ranks): the step then skips its NaN/Inf check and
                its host synchronisation.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # A step called inside an autocast region would run the projections in bf16 (issue 13 audit).
        with autocast_disabled_on(p for group in self.param_groups for p in group["params"]):
            self._step(check_finite)
        return loss

    def _step(self, check_finite: bool = True) -> None:
        """The step itself: the non-finite check, projections, the base step, the write-backs."""
        prepared: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        if check_finite and not self._poisoned:  # else a micro-batch already spoiled this step: no need to look again
            checked, prepared = self._checked_gradients()
            bad = self._nonfinite(checked)  # the step's one host synchronisation
            del checked  # each projection is then freed once its weight is updated
            if bad:
                self._refuse_or_skip(bad, "the step")  # raises, or (nonfinite="skip") marks the step
        if self._poisoned:  # nonfinite="skip": the whole step goes, accumulated micro-batches included
            self._skipped_steps.add_(1)
            self._drop_accumulation()
            return
        todo = self._lowrank_params()
        self._sync_base_groups()
        batches = self._base_step_batches(todo)
        if len(batches) < 2:
            self._step_lowrank(todo, prepared)  # one base step for every weight, plain ones included
            return
        # A per-parameter base: the plain weights first (no shadow has a gradient), then each batch of projected
        # weights with the plain gradients set aside, so only that batch's R~ are alive.
        self._base.step()
        plain = [p for group in self._base.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in plain]
        try:
            for p in plain:
                p.grad = None
            for batch in batches:
                self._step_lowrank(batch, prepared)
        finally:
            for p, grad in zip(plain, grads, strict=True):
                p.grad = grad

    def _base_step_batches(
        self, todo: list[tuple[torch.Tensor, dict[str, Any], int]]
    ) -> list[list[tuple[torch.Tensor, dict[str, Any], int]]]:
        """``todo`` cut into runs that share one base step: all of it for a base not known to be per-parameter;
        otherwise consecutive weights whose inner updates together fit in the largest weight's size (the step's
        transient already holds that much), so the peak does not grow with depth and small weights (APOLLO-Mini's
        1 x n) still share one call."""
        if not self._one_at_a_time or len(todo) < 2:
            return [todo]
        budget = max(p.numel() for p, _, _ in todo)
        batches: list[list[tuple[torch.Tensor, dict[str, Any], int]]] = [[]]
        used = 0
        for item in todo:
            p, group, _ = item
            rows, cols = self.backend.projected_shape(
                p, get_projector(group["projector"]).basis_rank(p.shape, group["rank"])
            )
            size = rows * cols
            if batches[-1] and used + size > budget:
                batches.append([])
                used = 0
            batches[-1].append(item)
            used += size
        return batches

    def _step_lowrank(
        self,
        todo: list[tuple[torch.Tensor, dict[str, Any], int]],
        prepared: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Projects the gradients of ``todo``, runs one base step, writes each full update back."""
        pending = []
        for p, group, index in todo:
            state = self._init_state(p, group, index)
            basis, projected = prepared.pop(p, None) or (self._basis(p, group, state), None)
            low = self._take_projected_grad(p, group, state, basis, projected)
            shadow = self._shadows[p]
            shadow.data = torch.zeros_like(low)
            shadow.grad = low
            pending.append((p, group, state, basis))
        self._base.step()
        for p, group, state, basis in pending:
            shadow = self._shadows[p]
            # The shadow started at 0: its value is the inner update R~; the group's rule makes the full update.
            rule = get_update_rule(group["update"])
            sums = {"reduce": lambda value, frame, p=p: self.backend.sum_over_shards(value, p, frame)}
            update, rule_state = rule.apply(
                None if p.grad is None else self.backend.local(p.grad),
                shadow.grad,
                shadow.data,
                basis,
                state,
                weight_shape=p.shape,
                lr=group["lr"],
                scale_type=group["scale_type"],
                norm_growth_limit=rule.growth_limit(group),
                **(sums if rule.sharded else {}),
            )
            state.update(rule_state)
            self._write_back(p, update, group, state)
            shadow.grad = None
            shadow.data = shadow.data.new_empty(0)
            state["step"].add_(1)

    def _write_back(
        self, param: torch.Tensor, update: torch.Tensor, group: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> None:
        """Adds the projected-back ``update`` (this process's rows of it) to ``param``."""
        # INT8 weights are re-quantized with stochastic rounding; the stream depends on (seed, step) only.
        generator = (
            rounding_generator(int(state["seed"]), int(state["step"]), param.device)
            if is_quantized_weight(param)
            else None
        )
        self.backend.write_back(
            param,
            update,
            lr=group["lr"],
            weight_decay=group.get("weight_decay", 0.0),
            scale=group["scale"],
            generator=generator,
        )

    def _take_projected_grad(
        self,
        param: torch.Tensor,
        group: dict[str, Any],
        state: dict[str, torch.Tensor],
        basis: torch.Tensor,
        projected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected gradient of this step: the accumulator (emptied) plus the projection of ``param.grad``
        (``projected`` when the finiteness check formed it already)."""
        low = state.pop("grad_accum", None)
        if param.grad is not None:
            if projected is None:
                projected = self._project(param.grad, basis, group)
            low = projected if low is None else low.add_(projected)
        return low

    def _project(self, grad: torch.Tensor, basis: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """R = P^T G through the backend, in the group's ``proj_dtype`` when one is set; R in ``grad``'s dtype."""
        dtype = PROJ_DTYPES.get(group.get("proj_dtype"))  # absent from groups saved before the option
        if dtype is None or grad.dtype == dtype:
            return self.backend.project_gradient(grad, basis)
        return self.backend.project_gradient(grad.to(dtype), basis).to(grad.dtype)

    def accumulates_projected(self, param: torch.Tensor) -> bool:
        """True when :meth:`accumulate_grad` can take ``param``'s micro-batch gradients (a low-rank weight whose
        update rule does not read the raw gradient at the step); otherwise they accumulate in ``.grad``."""
        if not self.is_lowrank(param):
            return False
        group, _, _ = self._locate(param)
        return not get_update_rule(group["update"]).needs_full_gradient

    def refresh_due(self, param: torch.Tensor) -> bool:
        """True when the next gradient of ``param`` will rebuild its basis (in :meth:`accumulate_grad` or the step).

        The one prediction of a refresh: callers that must prepare the gradient a basis is built from (average it
        over the ranks, check it) ask here. Reads only CPU counters: no host synchronisation.
        """
        state = self.state.get(param)
        return not state or refresh_due(int(state["step"]), int(state["last_refresh"]), int(state["gap"]))

    def projected_accumulator(self, param: torch.Tensor) -> torch.Tensor | None:
        """The (r x max(m, n)) sum :meth:`accumulate_grad` built for ``param`` since its last step, or ``None``.

        The next step applies this tensor: a caller may change it in place (average it over the ranks, clip it).
        """
        state = self.state.get(param)
        return state.get("grad_accum") if state else None

    def drop_accumulation(self, param: torch.Tensor) -> None:
        """Forgets ``param``'s projected accumulator (its part of the pending step); ``.grad`` is left alone."""
        state = self.state.get(param)
        if state:
            state.pop("grad_accum", None)

    @torch.no_grad()
    def accumulate_grad(self, param: torch.Tensor, *, check_finite: bool = True) -> None:
        """Moves ``param.grad`` into a projected (r x max(m, n)) accumulator and frees the full gradient.

        Gradient accumulation in the low-rank space: between refreshes, the sum of projections equals the
        projection of the sum, so the next :meth:`step` applies the same update as if the full gradients had
        been summed, while only r x n floats are held. A refresh that falls due uses the first micro-batch's
        gradient. Plain parameters keep accumulating in ``.grad`` as usual.

        Non-finite values: between refreshes the projection is accumulated unchecked (no host synchronisation)
        and :meth:`step` finds it; where a basis refresh is due the gradient is checked first (one
        synchronisation, next to the SVD's), and a NaN/Inf follows the ``nonfinite`` policy: "raise" refuses
        (nothing changes), "skip" drops this gradient and marks the whole pending step to be skipped.

        Args:
            param: a low-rank weight (m x n) with a ``.grad``; without one nothing happens.
            check_finite: ``False`` when the caller has checked ``param.grad`` already (see :meth:`step`).

        Raises:
            ValueError: for a parameter that is not low-rank here, or (``nonfinite="raise"``) a non-finite
                gradient where a basis refresh is due.
        """
        if param.grad is None:
            return
        group, index, label = self._locate(param)
        if not self.is_lowrank(param):
            raise ValueError(f"{label} is not projected: accumulate its gradient in .grad instead")
        if get_update_rule(group["update"]).needs_full_gradient:
            raise ValueError(
                f"{label}: update={group['update']!r} scales the raw full gradient at the step, which a projected "
                "accumulator does not keep; accumulate in .grad (no accumulate_grad) for this group"
            )
        if self._poisoned:  # nonfinite="skip" and this step is lost already: just free the gradient
            param.grad = None
            return
        if check_finite and self.refresh_due(param) and get_projector(group["projector"]).uses_gradient:
            bad = self._nonfinite([(lambda: label, param.grad)])
            if bad:
                self._refuse_or_skip(bad, "accumulate_grad (a basis refresh was due)")
                param.grad = None
                return
        state = self._init_state(param, group, index)
        with autocast_disabled_on([param]):  # as in step(): fp32 projections inside an autocast region too
            state["grad_accum"] = self._take_projected_grad(param, group, state, self._basis(param, group, state))
        param.grad = None

    def _drop_accumulation(self) -> None:
        """Forgets the projected accumulators and the "skip" mark of the pending step."""
        for state in self.state.values():
            state.pop("grad_accum", None)
        self._poisoned = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients, the projected accumulators of :meth:`accumulate_grad` included."""
        super().zero_grad(set_to_none)
        self._drop_accumulation()

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus ``"base"`` (the inner optimizer's) and ``"galore"`` (``skipped_steps``)."""
        state_dict = super().state_dict()
        state_dict["base"] = self._base.state_dict()
        state_dict["galore"] = {"skipped_steps": self._skipped_steps.clone()}
        return state_dict

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The inner optimizer, stepping the shadow parameters (and the plain parameters themselves)."""
        return self._base

    def check_state_dict(self, state_dict: dict[str, Any], references: ReferenceStates | None = None) -> None:
        """Raises ``ValueError`` when ``state_dict`` does not fit this optimizer; changes nothing.

        Every saved tensor is compared with the shape this optimizer would create: GaLore's counters, basis (or
        codes and scales) and accumulator, and the inner optimizer's state of every shadow (r x max(m, n)) and
        plain parameter; so are the group layout and the options that fix shapes (rank, projector, proj_bits,
        proj_group_size). The message names the parameter, the entry and both shapes.

        Args:
            state_dict: what :meth:`state_dict` wrote.
            references: a cache of the inner optimizer's reference state shapes, shared between optimizers.
        """
        base_key = f"{self._base_cls.__qualname__}{sorted(self._base_kwargs.items())!r}"
        check_galore_state(
            self, state_dict, lambda groups: self._base_cls(groups, **self._base_kwargs), base_key, references
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` wrote, after :meth:`check_state_dict` (nothing changes when it raises)."""
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base")
        engine = state_dict.pop("galore", {})
        super().load_state_dict(state_dict)
        # torch.optim casts floating state to the parameter dtype (an fp32 basis would become bf16) and
        # integers to floats: put back every saved tensor with its own dtype, on the parameter's device.
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            param = params[index]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    device = "cpu" if key in _CPU_STATE else param.device
                    self.state[param][key] = value.to(device=device, copy=True)
        self._base.load_state_dict(base_state)
        # Same trap one level down: e.g. Adafactor keeps fp32 factors for bf16 parameters.
        base_params = [p for group in self._base.param_groups for p in group["params"]]
        for index, saved in base_state["state"].items():
            state = self._base.state[base_params[index]]
            for key, value in saved.items():
                current = state.get(key)
                if torch.is_tensor(value) and torch.is_tensor(current) and current.dtype != value.dtype:
                    state[key] = value.to(device=current.device, copy=True)
        # Checkpoints written before the non-finite policy have no "galore" entry: nothing was skipped then.
        self._skipped_steps = torch.as_tensor(engine.get("skipped_steps", 0), dtype=torch.int64).cpu().clone()
        self._poisoned = []

    def refresh_stats(self) -> list[dict[str, Any]]:
        """Per low-rank parameter: name, refresh count, current gap, last refresh step, steps taken, and the mean
        subspace overlap over the adaptive-refresh history (only with ``adaptive_refresh``; NaN before the first)."""
        stats = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not self.is_lowrank(p) or not state:
                    continue
                stats.append(
                    {
                        "param": _param_label(group, i, p),
                        "refreshes": int(state["refreshes"]),
                        "gap": int(state["gap"]),
                        "last_refresh": int(state["last_refresh"]),
                        "step": int(state["step"]),
                    }
                )
                if "similarity" in state:
                    stats[-1]["similarity"] = float(state["similarity"].nanmean())
        return stats

    def __repr__(self) -> str:
        return f"GaLore(base={self._base_cls.__name__}, groups={len(self.param_groups)})"


GaLore.__doc__ = f"{GaLore.__doc__}\n{options_doc()}\n"
