"""Layer-wise optimizer steps inside backward: gradient memory of one layer (GaLore, Zhao et al. 2024, Sec. 4.2).

:class:`LayerwiseOptimizer` gives every trainable parameter its own inner optimizer (built by a user factory:
``GaLoreAdamW``, ``torch.optim.AdamW``, bitsandbytes' ``AdamW8bit``, ...) and steps it from a
``register_post_accumulate_grad_hook`` as soon as that parameter's gradient is complete, then frees the
gradient. Only one layer's full gradient is alive at a time, instead of all of them until ``optimizer.step()``.

How a training step runs (``A = accumulation_steps``)::

    for micro_batch in range(A):          # the engine counts backward passes: no call marks the boundary
        loss = model(batch).loss / A
        loss.backward()                   # hooks step each parameter on the last micro-batch
    scheduler.step()                      # an ordinary torch.optim.lr_scheduler drives every inner optimizer
    log(optimizer.last_grad_norm)         # global gradient norm of the step that just ended

Micro-batches are counted by backward passes that reach at least one managed parameter: the end of each such
backward is detected with an autograd engine callback, and the ``A``-th one ends the step. ``zero_grad()``
discards a partial accumulation and restarts the count. Calling ``optimizer.step()`` raises: the steps already
happened inside backward.

Accumulation: a GaLore-managed low-rank weight moves each micro-batch's gradient into the GaLore optimizer's
projected (r x n) accumulator (``GaLore.accumulate_grad``), so its m x n gradient is freed at once; other
parameters accumulate in ``.grad`` as usual and step on the last micro-batch. A parameter that gets a
gradient in an early micro-batch but not in the last one is stepped when the last backward ends; a parameter
that gets no gradient during a whole step is skipped (its inner optimizer does not step), like torch.optim.

Gradient norm and clipping act on the gradient each inner optimizer receives: the full (accumulated,
averaged) gradient, except for low-rank weights with ``A > 1``, where only the projected accumulator
``P^T sum(G)`` exists; its norm is at most the full gradient's norm for an orthonormal basis ("svd", "rsvd").
``last_grad_norm`` is the square root of the sum of these squared norms, measured before clipping.
- ``clip_mode="per-param"``: each gradient is clipped to ``max_grad_norm`` by its own norm, in flight.
- ``clip_mode="global-previous"``: the global norm of a step is only known once the step is over, after every
  parameter has moved. Step ``t`` therefore scales every gradient by ``min(1, max_grad_norm / (norm_{t-1} +
  1e-6))``, the coefficient ``torch.nn.utils.clip_grad_norm_`` would have used one step earlier; step 0 is
  not clipped. This damps runaway norms with one step of delay; it does not bound the norm of step ``t``.

Multi-process (``torchrun``, any backend that supports ``all_reduce``): every rank runs the same model on
its shard of the batch, without a DDP wrapper; the hook averages each gradient over the ranks right before
stepping it, so every rank applies the same update. Communication happens once per accumulated step. For
low-rank weights with ``A > 1`` the r x n accumulator is averaged, not the m x n gradient; the projection
basis is built from a local gradient, so at a micro-batch where a basis refresh is due the full gradient is
averaged first (refreshes are rare: one m x n all-reduce every ``update_gap`` steps), and all ranks build the
same basis. Every rank must produce gradients for the same parameters in the same order (as DDP without
``find_unused_parameters``), otherwise the collectives mismatch.

FSDP2 (``fully_shard``; the GaLore 2 design, arXiv 2504.20437): the parameters are then row-sharded DTensors and
torch runs their post-accumulate-grad hooks right after each reduce-scatter, so the engine steps every shard as soon
as its averaged gradient exists and frees it; the engine itself averages nothing (FSDP2 did). The inner optimizers
must accept shards: :class:`~lowrank_train.integrations.fsdp.FSDP2GaLore` or any GaLore preset given
``backend=FSDP2Backend()`` for low-rank groups, ``torch.optim`` optimizers for the rest. The NaN/Inf check and the
gradient norm of a shard are one all-reduce of two floats (nothing where every rank holds the tensor whole), so every
rank skips and clips alike. Accumulation: FSDP2 reduce-scatters every micro-batch (leave
``set_requires_gradient_sync`` on: a backward that reduces nothing is not counted as a micro-batch); a low-rank
shard then moves into its projected accumulator (one r x n all-reduce per micro-batch when m <= n, none when
m > n), any other shard accumulates in its sharded ``.grad`` (m_k x n, as FSDP2 does). See
:func:`lowrank_train.integrations.fsdp.fsdp2_layerwise`.

Update rules that read the raw gradient at the step (APOLLO, Fira: ``GaLore.accumulates_projected`` is False) keep
accumulating in ``.grad`` over the micro-batches and step at the last one, like plain parameters: with
accumulation their full gradients (a shard of them under FSDP2) stay alive until the last backward, as in an
ordinary loop; with ``accumulation_steps=1`` they are stepped and freed one at a time.

Seeds: GaLore seeds a parameter's random projections ("random", "rsvd") and the stochastic rounding of INT8
weights with ``seed_offset`` plus the parameter's index inside its optimizer. Every inner optimizer of a low-rank
group holds one parameter (index 0) and gets its own ``seed_offset``: the parameter's position in this engine,
counted over all groups. Each weight thus gets its own streams, the ones a single GaLore over the same groups in
the same order would give it, so layer-wise and ordinary steps match for every projector and for INT8 weights.

Non-finite gradients (issue 12 item 5): a parameter is stepped inside backward before the next one's gradient
exists, so a step cannot be refused as a whole. The engine therefore checks each gradient right before stepping it
(after averaging over the ranks, so every rank decides alike; one host synchronisation per parameter, the price of
deciding before the gradient is freed; a GaLore inner optimizer is told not to check again: ``check_finite=False``)
and treats a NaN/Inf gradient like a missing one: that parameter is not stepped, its gradient (and projected
accumulator) is cleared, its inner optimizer does not count the step; every finite parameter is stepped as usual,
the step ends and ``steps`` counts it. The gradient norm counts only what
was stepped. Then ``nonfinite="raise"`` (default) raises a ``ValueError`` at the end of that backward naming the
skipped parameters and saying that the others were stepped; ``"skip"`` only counts: :attr:`skipped_steps`
(steps with a skipped parameter) and :attr:`skipped_updates` (parameter updates skipped). Either way the next
backward needs no ``zero_grad()``. At a micro-batch where a low-rank weight's basis refresh is due, its gradient
is checked before the basis is built from it, and a NaN/Inf there skips that weight for the whole step.

Engine state in :meth:`LayerwiseOptimizer.state_dict` (tensors, ``torch.load(weights_only=True)`` safe):
``"inner"`` holds one ``state_dict()`` per parameter in parameter order, ``"layerwise"`` holds ``steps``,
``skipped_steps`` and ``skipped_updates`` (int64) and ``last_grad_norm`` (fp32, absent before the first step).
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_train.optim.backend import is_dtensor
from lowrank_train.optim.functional import finite_flags
from lowrank_train.optim.param_groups import check_unique_params
from lowrank_train.optim.state_checks import (
    ReferenceStates,
    check_entry,
    check_group_sizes,
    check_optimizer_state,
)

CLIP_MODES = ("global-previous", "per-param")
NONFINITE_POLICIES = ("raise", "skip")
_SHOWN_NAMES = 6  # parameters named in a non-finite message before "and N more"
_CLIP_EPS = 1e-6  # the eps of torch.nn.utils.clip_grad_norm_, so the coefficients match it
_NOT_SYNCED = ("params", "param_names", "seed_offset")
# param -> weak reference to the LayerwiseOptimizer whose hook steps it: two engines on one parameter would
# step it twice per backward.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True)
class LayerwiseConfig:
    """Settings of :class:`LayerwiseOptimizer`.

    Attributes:
        accumulation_steps: micro-batches (backward passes) per optimizer step, >= 1.
        max_grad_norm: clip threshold, ``None`` for no clipping (the norm is still reported).
        clip_mode: "global-previous" (global norm of the previous step) or "per-param" (each gradient by
            its own norm, in flight).
        nonfinite: "raise" or "skip": what happens after a step in which a parameter's gradient held NaN/Inf
            (that parameter is never stepped; see the module docstring).
    """

    accumulation_steps: int = 1
    max_grad_norm: float | None = None
    clip_mode: str = "global-previous"
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        steps = self.accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1 (1 = no accumulation), got {steps!r}")
        norm = self.max_grad_norm
        if norm is not None and (
            isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm <= 0
        ):
            raise ValueError(f"max_grad_norm must be a finite number > 0, or None for no clipping, got {norm!r}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))``, the factor ``torch.nn.utils.clip_grad_norm_`` multiplies by.

    Args:
        norm: 0-d gradient norm.
        max_norm: clip threshold.

    Returns:
        0-d tensor on ``norm``'s device (no host synchronisation).
    """
    return torch.clamp(max_norm / (norm + _CLIP_EPS), max=1.0)


def gradient_norm(grad: torch.Tensor) -> torch.Tensor:
    """fp32 Euclidean norm of ``grad`` (any shape, any float dtype), a 0-d tensor."""
    return torch.linalg.vector_norm(grad, dtype=torch.float32)


@runtime_checkable
class ProjectingOptimizer(Protocol):
    """What the engine asks of a GaLore-like inner optimizer (:class:`~lowrank_train.optim.galore.GaLore`).

    The engine uses nothing else of it: no private attribute, no ``state`` key (issue 19 item 3). It checks each
    gradient for NaN/Inf itself (after averaging over the ranks) and passes ``check_finite=False``, so a gradient
    is checked once.
    """

    def is_lowrank(self, param: torch.Tensor) -> bool:
        """True when ``param``'s gradient is projected."""
        ...

    def refresh_due(self, param: torch.Tensor) -> bool:
        """True when the next gradient of ``param`` will rebuild its basis (the engine's only refresh prediction)."""
        ...

    # Optional: ``accumulates_projected(param) -> bool``, True when accumulate_grad can take ``param`` (GaLore's is
    # False for update rules that read the raw gradient at the step); without it every low-rank param can.

    def accumulate_grad(self, param: torch.Tensor, *, check_finite: bool = True) -> None:
        """Adds the projection of ``param.grad`` to its accumulator and frees ``param.grad``."""
        ...

    def projected_accumulator(self, param: torch.Tensor) -> torch.Tensor | None:
        """The accumulated projected gradient the next step applies (changeable in place), or ``None``."""
        ...

    def drop_accumulation(self, param: torch.Tensor) -> None:
        """Forgets ``param``'s projected accumulator."""
        ...

    def step(self, closure: Callable[[], float] | None = None, *, check_finite: bool = True) -> float | None:
        """One step; ``check_finite=False`` skips the NaN/Inf check the caller has done."""
        ...


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Steps every parameter inside backward with its own inner optimizer, then frees its gradient.

    See the module docstring for the step protocol, accumulation, clipping and multi-process behaviour.

    Args:
        model_or_params: a module (all its trainable parameters, one group, with names), or parameters /
            param groups such as :func:`lowrank_param_groups`. Group keys other than ``params`` are passed to
            the inner optimizers; the inner optimizers' hyperparameters appear in :attr:`param_groups`, so LR
            schedulers work on this object.
        make_optimizer: called once per parameter with a one-element list of groups holding only that
            parameter (``[{"params": [p], "param_names": [name], **group_options}]``); returns an optimizer
            over exactly that parameter, e.g. ``lambda groups: GaLoreAdamW(groups, lr=1e-3)``.
        accumulation_steps: backward passes per optimizer step.
        max_grad_norm: clip threshold, or ``None`` (no clipping; the norm is still reported).
        clip_mode: "global-previous" or "per-param" (see the module docstring).
        nonfinite: "raise" (default) or "skip": after a step in which some gradient held NaN/Inf, raise a
            ``ValueError`` naming the parameters that were not stepped, or only count it (see the module docstring).
        process_group: group to average gradients over; ``None`` means the default group when
            ``torch.distributed`` is initialised with more than one process, else no communication.

    Raises:
        ValueError: bad settings, no trainable parameter, a parameter without ``requires_grad``, or a
            factory that returns something other than an optimizer over exactly its parameter.

    Example:
        >>> groups = lowrank_param_groups(model, rank=128, update_gap=200)
        >>> opt = LayerwiseOptimizer(groups, lambda g: GaLoreAdamW(g, lr=1e-3), accumulation_steps=4)
        >>> scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[Any],
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        clip_mode: str = "global-previous",
        process_group: Any = None,
        nonfinite: str = "raise",
    ):
        self.config = LayerwiseConfig(accumulation_steps, max_grad_norm, clip_mode, nonfinite)
        if not callable(make_optimizer):
            raise ValueError(f"make_optimizer must be a callable returning an optimizer, got {make_optimizer!r}")
        self._make_optimizer = make_optimizer
        self._params: list[torch.Tensor] = []
        self._labels: list[str] = []
        self._inner: list[torch.optim.Optimizer] = []
        self._position: dict[torch.Tensor, tuple[int, int]] = {}  # param -> (index, group index)
        self._lowrank: set[torch.Tensor] = set()
        self._projecting: set[torch.Tensor] = set()  # inner follows ProjectingOptimizer: step(check_finite=False)
        self._sharded: set[torch.Tensor] = set()  # FSDP2 DTensor parameters: FSDP2 averages, checks all-reduce
        self._hooks: list[Any] = []
        self._process_group = process_group
        self._reset_accumulation()
        self._steps = 0
        self._skipped_steps = torch.zeros((), dtype=torch.int64)  # CPU counters, saved in state_dict
        self._skipped_updates = torch.zeros((), dtype=torch.int64)
        self._last_norm: torch.Tensor | None = None
        self._clip_coef: torch.Tensor | None = None  # global-previous: factor from the previous step's norm
        groups = self._as_groups(model_or_params)
        super().__init__(groups, {})

    # ----- construction -------------------------------------------------------------------------
    @staticmethod
    def _as_groups(model_or_params: nn.Module | Iterable[Any]) -> list[Any]:
        if isinstance(model_or_params, nn.Module):
            named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
            if not named:
                raise ValueError(
                    f"{type(model_or_params).__name__} has no trainable parameter (every requires_grad is False): "
                    "nothing to optimize"
                )
            return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
        if isinstance(model_or_params, torch.Tensor):
            raise ValueError("pass a module, an iterable of parameters or a list of param groups, not one tensor")
        groups = []
        for group in model_or_params:  # materialise generators: they are read twice
            if isinstance(group, dict):
                params = group["params"]
                groups.append({**group, "params": [params] if isinstance(params, torch.Tensor) else list(params)})
            else:
                groups.append(group)
        found = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        if not found:
            raise ValueError("no trainable parameter was given: the parameter list (or every group) is empty")
        return groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; each of its parameters gets an inner optimizer and a post-accumulate-grad hook.

        Raises:
            ValueError: a parameter listed twice or already in another group, one without ``requires_grad``, one
                another engine steps, or a factory result over another parameter.
        """
        if isinstance(param_group, dict) and not isinstance(param_group.get("params", set()), set):
            params = param_group["params"]  # torch refuses sets (unordered) itself
            param_group = {**param_group, "params": [params] if isinstance(params, torch.Tensor) else list(params)}
            where = f"LayerwiseOptimizer param group {len(self.param_groups)}"
            check_unique_params(param_group, self.param_groups, where)
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        group = self.param_groups[group_index]
        names = group.get("param_names")
        options = {k: v for k, v in group.items() if k not in _NOT_SYNCED}
        for local, p in enumerate(group["params"]):
            label = f"{names[local] if names else f'params[{local}]'} (shape {tuple(p.shape)})"
            if not p.requires_grad:
                raise ValueError(f"{label} does not require grad: leave frozen parameters out of the optimizer")
            self._check_not_owned(p, label)
            inner_group: dict[str, Any] = {"params": [p], **options}
            if names:
                inner_group["param_names"] = [names[local]]
            if "rank" in options:  # distinct random-projection / rounding streams, as one GaLore over all params
                inner_group["seed_offset"] = len(self._params)
            inner = self._make_optimizer([inner_group])
            self._check_inner(inner, p, label)
            # The inner group becomes visible to schedulers: its defaults, and what a preset wrote over the given
            # options (APOLLO's projector and scale, issue 21), which the per-step sync must not undo.
            for key, value in inner.param_groups[0].items():
                if key not in _NOT_SYNCED:
                    group[key] = value
            self._position[p] = (len(self._params), group_index)
            self._params.append(p)
            self._labels.append(label)
            self._inner.append(inner)
            if isinstance(inner, ProjectingOptimizer):
                self._projecting.add(p)
                accumulates = getattr(inner, "accumulates_projected", inner.is_lowrank)
                if inner.is_lowrank(p) and accumulates(p):
                    self._lowrank.add(p)
            if is_dtensor(p):
                self._sharded.add(p)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready_hook()))
            _OWNERS[p] = weakref.ref(self)

    def _check_not_owned(self, param: torch.Tensor, label: str) -> None:
        owner = _OWNERS.get(param)
        if owner is not None and owner() is not None:
            gc.collect()  # an unreachable engine caught in a reference cycle is not a real owner
        if owner is not None and owner() is not None:
            raise ValueError(
                f"{label} is already stepped by another LayerwiseOptimizer: both would step it in every backward. "
                "Call remove_hooks() on the old one (or delete it) first"
            )

    @staticmethod
    def _check_inner(inner: Any, param: torch.Tensor, label: str) -> None:
        if not isinstance(inner, torch.optim.Optimizer):
            raise ValueError(f"make_optimizer must return a torch.optim.Optimizer, got {type(inner).__name__}")
        owned = [q for g in inner.param_groups for q in g["params"]]
        if len(owned) != 1 or owned[0] is not param:
            raise ValueError(
                f"make_optimizer must build an optimizer over exactly the parameter it is given ({label}); "
                f"it returned one over {len(owned)} parameter(s). Build it from the groups argument"
            )

    def remove_hooks(self) -> None:
        """Detaches the engine from the parameters (their gradients then stay in ``.grad``)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for param in self._params:
            owner = _OWNERS.get(param)
            if owner is not None and owner() is self:
                del _OWNERS[param]

    # ----- introspection ------------------------------------------------------------------------
    @property
    def accumulation_steps(self) -> int:
        """Backward passes per optimizer step."""
        return self.config.accumulation_steps

    @property
    def micro_step(self) -> int:
        """Backward passes done in the current (unfinished) step, ``0 <= micro_step < accumulation_steps``."""
        return self._micro

    @property
    def steps(self) -> int:
        """Optimizer steps completed."""
        return self._steps

    @property
    def skipped_steps(self) -> int:
        """Steps in which at least one parameter was not stepped because its gradient held NaN/Inf."""
        return int(self._skipped_steps)

    @property
    def skipped_updates(self) -> int:
        """Parameter updates skipped for a NaN/Inf gradient, over all steps."""
        return int(self._skipped_updates)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """0-d fp32 global gradient norm of the last completed step (before clipping), ``None`` before it."""
        return self._last_norm

    def inner_optimizer(self, param: torch.Tensor) -> torch.optim.Optimizer:
        """The inner optimizer stepping ``param``."""
        if param not in self._position:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not managed by this optimizer")
        return self._inner[self._position[param][0]]

    def is_lowrank(self, param: torch.Tensor) -> bool:
        """True when ``param`` accumulates projected (r x n) gradients instead of full ones."""
        return param in self._lowrank

    # ----- the step, inside backward ------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> None:
        """Refused: a layer-wise optimizer steps each parameter inside ``backward()``.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(
            "LayerwiseOptimizer.step() must not be called: every parameter is stepped inside backward() as soon "
            "as its gradient is ready, and the last of every `accumulation_steps` backward passes ends the step. "
            "Remove the optimizer.step() call; keep scheduler.step() and read optimizer.last_grad_norm after it"
        )

    def _distributed(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self._process_group) > 1

    def _average(self, tensor: torch.Tensor) -> None:
        """In-place mean over the ranks (SUM then divide: gloo has no AVG)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._process_group)
        tensor.div_(dist.get_world_size(self._process_group))

    @torch.no_grad()
    def _on_grad_ready_hook(self) -> Callable[[torch.Tensor], None]:
        # The hook holds the engine weakly: a discarded engine must neither stay alive nor keep stepping.
        engine_ref = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            engine = engine_ref()
            if engine is not None:
                engine._on_grad_ready(param)

        return hook

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self._end_queued:
            # Runs once the whole backward pass is over: that is where a micro-batch (and a step) ends.
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
            self._end_queued = True
        if param.grad is None:
            return
        if param in self._skipped:  # its step is lost already (a NaN/Inf at a basis refresh): free the gradient
            param.grad = None
            return
        last = self._micro == self.accumulation_steps - 1
        if param in self._lowrank and self.accumulation_steps > 1:
            self._accumulate_projected(param)
            if param in self._skipped:
                return
        if last:
            self._step_param(param)
        else:
            self._pending.add(param)

    def _finite(self, grad: torch.Tensor) -> bool:
        """True when ``grad`` holds no NaN/Inf (one host synchronisation: the step decision cannot wait)."""
        return bool(finite_flags([grad])[0])

    def _inspect(self, param: torch.Tensor, grad: torch.Tensor, frame: str) -> tuple[bool, torch.Tensor | None]:
        """(finite on every rank, squared norm over the shards or ``None``) of what ``param`` is about to apply.

        A dense gradient is checked locally (the norm follows later); an FSDP2 shard (``frame``: "weight" for its
        gradient, "projected" for its projected accumulator) in one all-reduce of its flag and squared norm.
        """
        if param not in self._sharded:
            return self._finite(grad), None
        from lowrank_train.integrations.fsdp import sharded_check  # FSDP2 only: keeps DTensor imports lazy

        return sharded_check(grad, param, frame)

    def _skip(self, param: torch.Tensor) -> None:
        """Leaves ``param`` unstepped this step: clears its gradient and projected accumulator, records it."""
        param.grad = None
        if param in self._lowrank:
            self._inner[self._position[param][0]].drop_accumulation(param)
        self._skipped.add(param)
        self._pending.discard(param)
        self._local.discard(param)

    def _accumulate_projected(self, param: torch.Tensor) -> None:
        """Moves ``param.grad`` into its GaLore accumulator; the full gradient is freed."""
        inner = self._inner[self._position[param][0]]
        due = inner.refresh_due(param)  # asked before accumulate_grad, which may refresh
        if param in self._sharded:
            pass  # FSDP2 reduce-scattered the mean already; every rank builds the basis from the same full gradient
        elif due and self._distributed():  # every rank must build the same basis: from the averaged gradient
            self._average(param.grad)
        else:
            self._local.add(param)
        # A basis is about to be built from this gradient: check it first (refreshes are rare; the SVD syncs anyway).
        if due and not self._inspect(param, param.grad, "weight")[0]:
            self._skip(param)
            return
        inner.accumulate_grad(param, check_finite=False)  # checked here, or found when the step ends

    def _step_param(self, param: torch.Tensor) -> None:
        index, group_index = self._position[param]
        inner = self._inner[index]
        if param in self._lowrank and self.accumulation_steps > 1:
            grad = inner.projected_accumulator(param)
            if grad is None:  # nothing was accumulated: nothing to step
                self._pending.discard(param)
                self._local.discard(param)
                return
            if param in self._local and self._distributed():
                self._average(grad)
            frame = "projected"
        else:
            grad = param.grad
            if self._distributed() and param not in self._sharded:
                self._average(grad)
            frame = "weight"
        # The step's one check (and host synchronisation), after averaging: every rank skips the same parameters.
        finite, square = self._inspect(param, grad, frame)
        if not finite:
            self._skip(param)
            return
        if square is None:
            norm = gradient_norm(grad)
            square = norm.square()
        else:
            norm = square.sqrt()
        self._sq_norm = square if self._sq_norm is None else self._sq_norm + square.to(self._sq_norm)
        coefficient = self._clip_coef
        if self.config.max_grad_norm is not None and self.config.clip_mode == "per-param":
            coefficient = clip_coefficient(norm, self.config.max_grad_norm)
        if coefficient is not None:
            local = grad.to_local() if is_dtensor(grad) else grad  # a DTensor refuses a plain-tensor factor
            local.mul_(coefficient.to(local.device, local.dtype))
        # Hyperparameters live in our groups (schedulers write there); the inner group follows them.
        inner_group = inner.param_groups[0]
        for key, value in self.param_groups[group_index].items():
            if key not in _NOT_SYNCED:
                inner_group[key] = value
        if param in self._projecting:
            inner.step(check_finite=False)  # checked above
        else:
            inner.step()
        param.grad = None
        self._pending.discard(param)
        self._local.discard(param)

    @torch.no_grad()
    def _on_backward_end(self) -> None:
        self._end_queued = False
        self._micro += 1
        if self._micro < self.accumulation_steps:
            return
        for param in [p for p in self._params if p in self._pending]:  # fixed order: ranks must agree
            self._step_param(param)
        skipped = [label for p, label in zip(self._params, self._labels, strict=True) if p in self._skipped]
        index = self._steps
        self._finish_step()
        if skipped:
            self._report_nonfinite(skipped, index)

    def _report_nonfinite(self, skipped: list[str], index: int) -> None:
        """Counts a step with skipped parameters and, under ``nonfinite="raise"``, says what was and was not done."""
        self._skipped_steps.add_(1)
        self._skipped_updates.add_(len(skipped))
        if self.config.nonfinite == "skip":
            return
        shown = ", ".join(skipped[:_SHOWN_NAMES])
        if len(skipped) > _SHOWN_NAMES:
            shown += f" and {len(skipped) - _SHOWN_NAMES} more"
        raise ValueError(
            f"non-finite gradient (NaN/Inf) in {len(skipped)} of {len(self._params)} parameters in step {index} "
            f"(counting from 0; optimizer.steps is now {index + 1}): {shown}. Those were not stepped (their "
            "gradients were cleared and their inner optimizers did not count the step); every other parameter "
            "with a gradient was stepped inside "
            "backward as usual, and the step is complete. The next backward needs no zero_grad(). Look for the "
            "cause (learning rate, loss scale, a bad batch), or build the LayerwiseOptimizer with nonfinite='skip' "
            "to count such steps in optimizer.skipped_steps instead"
        )

    def _finish_step(self) -> None:
        norm = self._sq_norm.sqrt() if self._sq_norm is not None else None
        if norm is not None:
            self._last_norm = norm
            if self.config.max_grad_norm is not None and self.config.clip_mode == "global-previous":
                self._clip_coef = clip_coefficient(norm, self.config.max_grad_norm)
        self._steps += 1
        self._reset_accumulation()
        # LR schedulers warn unless they saw optimizer.step() run; the step ran here instead.
        self._opt_called = True

    def _reset_accumulation(self) -> None:
        self._micro = 0
        self._end_queued = False
        self._pending: set[torch.Tensor] = set()
        self._local: set[torch.Tensor] = set()
        self._skipped: set[torch.Tensor] = set()  # not stepped this step: NaN/Inf gradient
        self._sq_norm: torch.Tensor | None = None

    # ----- zero_grad and checkpoints ------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears gradients and discards a partial accumulation (projected accumulators included).

        After a completed step there is nothing to clear; mid-accumulation this drops the micro-batches seen so
        far (as ``zero_grad`` does in an ordinary loop) and restarts the micro-batch count.
        """
        for param, inner in zip(self._params, self._inner, strict=True):
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()
            if param in self._lowrank:
                inner.drop_accumulation(param)
        self._reset_accumulation()

    def _check_boundary(self, action: str) -> None:
        if self._micro or self._pending:
            raise RuntimeError(
                f"{action} in the middle of an accumulated step (after backward {self._micro} of "
                f"{self.accumulation_steps}): do it at a step boundary, or call zero_grad() to drop the partial step"
            )

    def state_dict(self) -> dict[str, Any]:
        """Outer groups, one inner ``state_dict()`` per parameter, and the engine's counters (all tensors)."""
        self._check_boundary("state_dict()")
        state_dict = super().state_dict()
        state_dict["inner"] = [inner.state_dict() for inner in self._inner]
        engine = {
            "steps": torch.tensor(self._steps, dtype=torch.int64),
            "skipped_steps": self._skipped_steps.clone(),
            "skipped_updates": self._skipped_updates.clone(),
        }
        if self._last_norm is not None:
            engine["last_grad_norm"] = self._last_norm.detach().to("cpu", torch.float32, copy=True)
        state_dict["layerwise"] = engine
        return state_dict

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Raises ``ValueError`` when ``state_dict`` does not fit this optimizer; changes nothing.

        Every inner state is checked before any is loaded: a GaLore inner optimizer by its own
        ``check_state_dict``, any other by comparing each saved tensor with the state a fresh optimizer from
        ``make_optimizer`` creates for the parameter. The message names the parameter, the entry and both shapes.
        """
        if not isinstance(state_dict, dict) or not {"inner", "layerwise", "param_groups"} <= set(state_dict):
            found = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"cannot load this state into a LayerwiseOptimizer: it has {found}, not the 'inner', 'layerwise' and "
                "'param_groups' entries LayerwiseOptimizer.state_dict() writes (one inner optimizer state per "
                "parameter). Load it into the optimizer that saved it, or start the optimizer state afresh"
            )
        inner_states = state_dict["inner"]
        if len(inner_states) != len(self._inner):
            raise ValueError(
                f"the state dict holds {len(inner_states)} inner optimizers, this optimizer manages "
                f"{len(self._inner)} parameters"
            )
        check_group_sizes(state_dict["param_groups"], self.param_groups, "LayerwiseOptimizer")
        references = ReferenceStates()
        for label, inner, saved in zip(self._labels, self._inner, inner_states, strict=True):
            check = getattr(inner, "check_state_dict", None)
            if callable(check):
                check(saved, references=references)
            else:
                check_optimizer_state(inner, saved, self._make_optimizer, [label], references)
        engine = state_dict["layerwise"]
        for key in ("steps", "skipped_steps", "skipped_updates", "last_grad_norm"):
            if key in engine:
                check_entry("the optimizer", "LayerwiseOptimizer engine", key, engine[key], ())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads what :meth:`state_dict` produced (e.g. through ``torch.load(..., weights_only=True)``).

        Everything is checked first (:meth:`check_state_dict`): nothing changes when it raises.

        Raises:
            ValueError: a state that does not fit (another model, rank or inner optimizer), naming the parameter.
            RuntimeError: in the middle of an accumulated step.
        """
        self._check_boundary("load_state_dict()")
        self.check_state_dict(state_dict)
        inner_states = state_dict["inner"]
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        for inner, saved in zip(self._inner, inner_states, strict=True):
            inner.load_state_dict(saved)
        engine = state_dict["layerwise"]
        self._steps = int(engine["steps"])
        # States saved before the non-finite policy have no skip counters: nothing was skipped then.
        self._skipped_steps = torch.tensor(int(engine.get("skipped_steps", 0)), dtype=torch.int64)
        self._skipped_updates = torch.tensor(int(engine.get("skipped_updates", 0)), dtype=torch.int64)
        device = self._params[0].device
        self._last_norm = engine["last_grad_norm"].to(device) if "last_grad_norm" in engine else None
        self._clip_coef = None
        if self._last_norm is not None and self.config.max_grad_norm is not None:
            if self.config.clip_mode == "global-previous":
                self._clip_coef = clip_coefficient(self._last_norm, self.config.max_grad_norm)
        self._reset_accumulation()

    def __repr__(self) -> str:
        kinds = sorted({type(inner).__name__ for inner in self._inner})
        return (
            f"LayerwiseOptimizer(params={len(self._params)}, inner={kinds}, "
            f"accumulation_steps={self.accumulation_steps}, max_grad_norm={self.config.max_grad_norm}, "
            f"clip_mode={self.config.clip_mode!r})"
        )
