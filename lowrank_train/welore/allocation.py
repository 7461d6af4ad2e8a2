"""Rank allocation: from singular value spectra and a parameter budget to a rank per matrix.

Every strategy is one *score* per singular direction (non-increasing along the spectrum). A threshold ``theta``
keeps the directions scoring ``>= theta``; a larger threshold keeps fewer. The threshold is solved by bisection
over the sorted scores so that the *parameter* reduction of the block linears reaches the target (issue 7: rank
reduction is not parameter reduction). After the rule proposes rank ``k`` for an ``m x n`` matrix, WeLore's
LRC/N-LRC split decides its fate: it is factorized (a Low-Rank Component) only if it loses at least ``min_ratio``
of its rank *and* ``k (m + n) < m n``; otherwise it stays dense (N-LRC) at full rank.

Strategies are registered by name (see :data:`STRATEGIES`); those flagged ``guard_candidate`` (``"whitened"``,
``"whitened-loss"``) are what the guarded default :data:`GUARDED` compares on held-out calibration sequences:

* ``"welore"``: the paper's data-free rule (Jaiswal et al., 2024, Sec. 3): min-max normalise each spectrum to
  ``[0, 1]`` and drop directions below ``tau``; ``tau`` by bisection.
* ``"welore-table"``: the same rule with the paper's fixed ``tau`` per target, fitted on LLaMA-2-7B (reference).
* ``"uniform"``: every matrix keeps the same fraction of its own parameters.
* ``"whitened"`` (data-aware, SVD-LLM whitening) and ``"asvd"`` (data-aware, ASVD channel scaling): the WeLore
  rule applied to the spectrum of the activation-weighted matrix, which is then also what gets truncated.
* ``"whitened-energy"``: whitened spectra, but a direction's score is its share of the matrix's output energy on
  the calibration inputs per parameter it costs (a greedy knapsack on relative output error). On SmolLM2-135M it
  was worse than ``"whitened"`` at 20% (perplexity 72 vs 64 on 4 x 512 KJV tokens): massive activations make a
  few directions hold almost all the energy of some down_proj inputs.
* ``"whitened-loss"`` (issue 16): ranks by the *estimated loss* of each truncation instead of a
  threshold. In the whitened space the output error of keeping rank ``k`` is the tail energy
  ``sum_{j >= k} s_j^2`` (per calibration token); scaling it by the layer's output sensitivity (the empirical
  Fisher trace per output, ``E ||dL/dy||^2 / out``, from one backward pass over the calibration set) makes it a
  second-order estimate of the language-model loss increase, comparable across layers. A global knapsack then
  spends the parameter budget where it buys the largest loss reduction per parameter, with the LRC/N-LRC
  choice (dense, or a rank that halves the matrix) as one of each matrix's options; see
  :func:`allocate_by_loss`. Two more defaults keep a narrow calibration set from deciding everything: the
  whitening second moment is shrunk 10% toward its diagonal (the per-channel scales, massive activations
  included, are the same on every text; the cross-channel correlations are what a small set over-fits), and a
  third of the calibration tokens are the model's own samples (:mod:`lowrank_train.welore.generation`). On
  SmolLM2-135M calibrated on 32 x 128 KJV tokens, a 20% cut gives 1.65x the dense perplexity on KJV, 1.80x on
  Shakespeare and 2.19x on Python documentation, where ``"whitened"`` gave 2.55x, 3.75x and 7.79x
  (``benchmarks/results/welore_ood.md``; each ingredient's share in ``welore_ood_ablation.md``). Without the
  sensitivity the same knapsack on absolute output error is far worse than ``"whitened"`` (12.8x dense in
  domain), and in a probe on relative output error it was worse too (3.0x vs 2.6x).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_train._registry import Registry

__all__ = [
    "OBJECTIVES",
    "STRATEGIES",
    "GUARDED",
    "GUARD_FALLBACK",
    "Allocation",
    "AllocationStrategy",
    "allocate_by_loss",
    "allocate_ranks",
    "get_strategy",
    "guard_candidates",
    "is_low_rank_component",
    "paper_tau",
    "register_strategy",
    "strategy_names",
    "truncation_losses",
]

ScoreFn = Callable[[Tensor, tuple[int, int]], Tensor]

# The strategy value meaning "let compress_model's held-out guard choose among the guard candidates".
GUARDED = "auto"
# The rule the guarded default falls back on when it cannot hold sequences out (precomputed statistics, a tiny set).
GUARD_FALLBACK = "whitened-loss"

# "threshold": one global threshold on per-direction scores; "loss": a knapsack on per-matrix truncation losses.
OBJECTIVES = ("threshold", "loss")

# The paper's fixed thresholds, as quoted in issue 7 (target rank reduction -> tau), fitted on LLaMA-2-7B.
# Targets in between are interpolated linearly.
PAPER_TAU_TABLE: tuple[tuple[float, float], ...] = ((0.1, 0.0225), (0.5, 0.175), (0.7, 0.26))


def minmax_scores(singular_values: Tensor, shape: tuple[int, int]) -> Tensor:
    """WeLore's normalised spectrum ``(s - min s) / (max s - min s)`` in ``[0, 1]``.

    Args:
        singular_values: ``(r,)`` descending.
        shape: ``(out, in)`` of the matrix (unused).

    Returns:
        ``(r,)`` scores.
    """
    s = singular_values.double()
    span = s.max() - s.min()
    if span <= 0:
        return torch.ones_like(s)
    return (s - s.min()) / span


def uniform_scores(singular_values: Tensor, shape: tuple[int, int]) -> Tensor:
    """Scores that make a threshold ``theta`` keep ``(1 - theta)`` of every matrix's parameters.

    Direction ``j`` (0-based) is kept when ``j (m + n) <= (1 - theta) m n``.

    Args:
        singular_values: ``(r,)`` (only its length is used).
        shape: ``(out, in)``.

    Returns:
        ``(r,)`` scores, decreasing.
    """
    out_features, in_features = shape
    index = torch.arange(singular_values.numel(), dtype=torch.float64)
    return 1.0 - index * (out_features + in_features) / (out_features * in_features)


def energy_scores(singular_values: Tensor, shape: tuple[int, int]) -> Tensor:
    """Share of the matrix's (weighted) energy per direction, divided by the parameters one direction costs.

    With whitening, ``sum_{j > k} s_j^2 / sum_j s_j^2`` is the relative output error of the rank-``k`` truncation
    on the calibration inputs, so a global threshold is a greedy knapsack: drop the directions with the smallest
    error per parameter saved.

    Args:
        singular_values: ``(r,)`` descending.
        shape: ``(out, in)``.

    Returns:
        ``(r,)`` scores, descending.
    """
    energy = singular_values.double().square()
    return energy / energy.sum().clamp_min(1e-300) / float(sum(shape))


@dataclass(frozen=True)
class AllocationStrategy:
    """A named rank-allocation rule.

    Attributes:
        name: registry key.
        score: per-direction scores from ``(singular_values, (out, in))``; non-increasing along the spectrum.
            Used by the ``"threshold"`` objective only.
        weighting: which spectrum it reads: ``"none"`` (plain weights), ``"whiten"`` (SVD-LLM) or ``"scale"``
            (ASVD). Weighted strategies need a calibration set, and truncate with the same weighting.
        fixed_threshold: if set, maps the target to a threshold directly instead of solving for the budget.
        objective: ``"threshold"`` (keep the directions scoring above one global threshold) or ``"loss"``
            (:func:`allocate_by_loss` on the tail energies of the spectra).
        sensitivity: scale each matrix's truncation loss by its output sensitivity (``"loss"`` objective only;
            needs a calibration set and one backward pass over it).
        shrinkage: fraction ``a`` of the whitening second moment moved to its diagonal,
            ``S' = (1 - a) S + a diag(S)`` (``"whiten"`` weighting only; 0 keeps ``S``).
        generated_fraction: share of the calibration tokens that the model generates itself and that are mixed
            into a token-id calibration set (see :mod:`lowrank_train.welore.generation`); data-aware only.
        guard_candidate: one of the allocations the guarded default (``strategy="auto"``) compares on held-out
            calibration sequences.
    """

    name: str
    score: ScoreFn | None = None
    weighting: str = "none"
    fixed_threshold: Callable[[float], float] | None = None
    objective: str = "threshold"
    sensitivity: bool = False
    shrinkage: float = 0.0
    generated_fraction: float = 0.0
    guard_candidate: bool = False

    def __post_init__(self) -> None:
        if self.weighting not in ("none", "whiten", "scale"):
            raise ValueError(f"weighting must be 'none', 'whiten' or 'scale', got {self.weighting!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "threshold" and self.score is None:
            raise ValueError(f"strategy {self.name!r}: the 'threshold' objective needs a score function")
        if self.objective == "loss" and self.fixed_threshold is not None:
            raise ValueError(f"strategy {self.name!r}: fixed_threshold applies to the 'threshold' objective only")
        if self.sensitivity and self.objective != "loss":
            raise ValueError(f"strategy {self.name!r}: sensitivity scales truncation losses; use objective='loss'")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"strategy {self.name!r}: shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.shrinkage > 0.0 and self.weighting != "whiten":
            raise ValueError(f"strategy {self.name!r}: shrinkage applies to weighting='whiten' only")
        if not 0.0 <= self.generated_fraction < 1.0:
            raise ValueError(
                f"strategy {self.name!r}: generated_fraction must be in [0, 1), got {self.generated_fraction}"
            )
        if self.generated_fraction > 0.0 and not self.needs_calibration:
            raise ValueError(f"strategy {self.name!r}: generated_fraction applies to data-aware strategies only")
        if self.name == GUARDED:
            raise ValueError(f"{GUARDED!r} is the guarded default of WeLoreConfig, not a strategy name")

    @property
    def needs_calibration(self) -> bool:
        return self.weighting != "none" or self.sensitivity


def paper_tau(target: float) -> float:
    """The paper's tau for a target rank reduction, linearly interpolated in its table.

    Raises:
        ValueError: outside the table's range ``[0.1, 0.7]``.
    """
    (low, low_tau), *_, (high, high_tau) = PAPER_TAU_TABLE
    if not low <= target <= high:
        raise ValueError(f"the paper's tau table covers targets in [{low}, {high}], got {target}")
    for (t0, tau0), (t1, tau1) in zip(PAPER_TAU_TABLE, PAPER_TAU_TABLE[1:], strict=False):
        if t0 <= target <= t1:
            return tau0 + (tau1 - tau0) * (target - t0) / (t1 - t0)
    return high_tau


STRATEGIES: Registry[AllocationStrategy] = Registry("allocation strategy", AllocationStrategy)


def register_strategy(strategy: AllocationStrategy, *, replace: bool = False) -> AllocationStrategy:
    """Adds a strategy to :data:`STRATEGIES` under ``strategy.name`` and returns it.

    Raises:
        ValueError: when the name is taken and ``replace`` is False, or ``strategy`` is not an AllocationStrategy.
    """
    return STRATEGIES.add(strategy, replace=replace)


def strategy_names() -> tuple[str, ...]:
    """Registered strategy names, in registration order."""
    return STRATEGIES.names()


def guard_candidates() -> tuple[str, ...]:
    """Names of the strategies the guarded default compares, in registration order."""
    return tuple(name for name, strategy in STRATEGIES.items() if strategy.guard_candidate)


def get_strategy(name: str) -> AllocationStrategy:
    """Look up a strategy by name.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    return STRATEGIES.lookup(name)


register_strategy(AllocationStrategy("welore", minmax_scores))
register_strategy(AllocationStrategy("welore-table", minmax_scores, fixed_threshold=paper_tau))
register_strategy(AllocationStrategy("uniform", uniform_scores))
register_strategy(AllocationStrategy("whitened", minmax_scores, weighting="whiten", guard_candidate=True))
register_strategy(AllocationStrategy("asvd", minmax_scores, weighting="scale"))
register_strategy(AllocationStrategy("whitened-energy", energy_scores, weighting="whiten"))
register_strategy(
    AllocationStrategy(
        "whitened-loss",
        weighting="whiten",
        objective="loss",
        sensitivity=True,
        shrinkage=0.1,
        generated_fraction=1 / 3,
        guard_candidate=True,
    )
)


def is_low_rank_component(rank: int, shape: tuple[int, int], min_ratio: float) -> bool:
    """WeLore's LRC test plus honest accounting: factorize only if the rank drops by ``>= min_ratio`` and
    ``rank (m + n) < m n``.

    Args:
        rank: proposed rank ``k``.
        shape: ``(m, n)``.
        min_ratio: minimum fraction of the full rank ``min(m, n)`` that must be removed.
    """
    out_features, in_features = shape
    full_rank = min(shape)
    return 1.0 - rank / full_rank >= min_ratio and rank * (out_features + in_features) < out_features * in_features


@dataclass(frozen=True)
class Allocation:
    """The outcome of :func:`allocate_ranks`.

    Attributes:
        proposed: rank the strategy's rule proposed for each matrix (before the LRC/N-LRC split).
        ranks: rank actually used: ``proposed`` for LRCs, the full rank for N-LRCs.
        lrc: whether each matrix is factorized.
        threshold: the threshold on the strategy's scores (``tau`` for the WeLore rules); for the ``"loss"``
            objective, the multiplier ``lambda`` (loss per parameter) of the last step the budget allowed.
        params_before: parameters of all the matrices, dense.
        params_after: parameters after factorizing the LRCs.
    """

    proposed: dict[str, int]
    ranks: dict[str, int]
    lrc: dict[str, bool]
    threshold: float
    params_before: int
    params_after: int

    @property
    def param_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before


def _ranks_at(scores: Mapping[str, Tensor], threshold: float) -> dict[str, int]:
    # At least one direction is always kept, so a factor never has an empty inner dimension.
    return {name: max(1, int((values >= threshold).sum())) for name, values in scores.items()}


def _params_after(
    proposed: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], min_ratio: float
) -> tuple[int, dict[str, bool]]:
    total, lrc = 0, {}
    for name, rank in proposed.items():
        m, n = shapes[name]
        lrc[name] = is_low_rank_component(rank, (m, n), min_ratio)
        total += rank * (m + n) if lrc[name] else m * n
    return total, lrc


def truncation_losses(singular_values: Tensor) -> Tensor:
    """Output error energy of each truncation: ``loss[k] = sum_{j >= k} s_j^2`` for ``k = 0 .. r``.

    For a whitened spectrum (``W L`` with ``L L^T = E[x x^T]``) this is ``E ||(W - W_k) x||^2`` per calibration
    token (Eckart-Young in the whitened space); for a plain one, the squared Frobenius error.

    Args:
        singular_values: ``(r,)`` descending.

    Returns:
        ``(r + 1,)`` float64, non-increasing and convex in ``k``, ``loss[r] = 0``.
    """
    energy = singular_values.detach().double().cpu().square()
    tail = energy.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def _lower_hull(costs: list[int], losses: list[float]) -> list[int]:
    # Indices of the lower convex hull of points sorted by increasing cost (monotone chain): only hull points
    # can minimise loss + lambda * cost for some lambda, and consecutive hull slopes decrease.
    hull: list[int] = []
    for index in range(len(costs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (costs[b] - costs[a]) * (losses[index] - losses[a]) - (losses[b] - losses[a]) * (
                costs[index] - costs[a]
            )
            if cross > 0:
                break
            hull.pop()
        hull.append(index)
    return hull


def allocate_by_loss(
    losses: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, int]],
    budget: float,
    min_ratio: float = 0.5,
) -> tuple[dict[str, int], dict[str, bool], float]:
    """Minimise the summed truncation loss subject to a parameter budget (a multiple-choice knapsack).

    Each matrix chooses one option: a Low-Rank Component at rank ``k`` (every ``k`` that
    :func:`is_low_rank_component` allows; ``k (m + n)`` parameters, loss ``losses[k]``) or dense (``m n``
    parameters, loss 0). Starting from the cheapest option everywhere, the steps along each matrix's lower convex
    hull of (parameters, loss) are taken in order of loss removed per parameter added (SVD-LLM v2's idea of
    allocating by truncation loss, solved as a Lagrangian greedy), until the next step no longer fits. Stopping
    there keeps the result a minimiser of ``loss + lambda * parameters``, so no allocation with at most as many
    parameters has a smaller summed loss; the budget is left unspent by less than one step.

    Args:
        losses: per matrix, ``(r + 1,)`` loss of keeping rank ``k`` (non-increasing), e.g. from
            :func:`truncation_losses`, already scaled by any per-matrix weight.
        shapes: ``(m, n)`` per matrix.
        budget: parameters the matrices may hold in total.
        min_ratio: LRC/N-LRC rule, see :func:`is_low_rank_component`.

    Returns:
        ``(ranks, lrc, lambda)``: the rank per matrix (the full rank when dense), whether it is factorized, and
        the loss per parameter of the step that did not fit (0 when every matrix stays dense).

    Raises:
        ValueError: if even the cheapest option everywhere exceeds the budget.
    """
    names = list(losses)
    options: dict[str, tuple[list[int], list[float], list[int]]] = {}  # costs, losses, ranks (hull points only)
    for name in names:
        m, n = shapes[name]
        full = min(m, n)
        curve = losses[name].detach().double().cpu()
        if curve.numel() != full + 1:
            raise ValueError(f"{name}: {curve.numel()} losses for a rank-{full} matrix; expected {full + 1}")
        ranks = [k for k in range(1, full + 1) if is_low_rank_component(k, (m, n), min_ratio)]
        costs = [k * (m + n) for k in ranks] + [m * n]
        values = curve[ranks].tolist() + [0.0]
        ranks = ranks + [full]
        hull = _lower_hull(costs, values)
        options[name] = ([costs[i] for i in hull], [values[i] for i in hull], [ranks[i] for i in hull])

    position = dict.fromkeys(names, 0)
    spent = sum(options[name][0][0] for name in names)
    if spent > budget:
        raise ValueError(
            f"the budget of {budget:,.0f} parameters cannot be met: the cheapest option everywhere (rank 1, or "
            f"dense where a matrix cannot be factorized at min_ratio={min_ratio}) holds {spent:,} parameters"
        )
    steps = []
    for order, name in enumerate(names):
        costs, values, _ = options[name]
        for index in range(len(costs) - 1):
            slope = (values[index] - values[index + 1]) / (costs[index + 1] - costs[index])
            steps.append((-slope, order, index, name))
    steps.sort()
    multiplier = 0.0
    for negative_slope, _, index, name in steps:
        costs = options[name][0]
        added = costs[index + 1] - costs[index]
        if spent + added > budget:
            multiplier = -negative_slope
            break
        spent += added
        position[name] = index + 1
    ranks = {name: options[name][2][position[name]] for name in names}
    lrc = {name: position[name] < len(options[name][0]) - 1 for name in names}
    return ranks, lrc, multiplier


def allocate_ranks(
    spectra: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, int]],
    target: float,
    strategy: str | AllocationStrategy = "welore",
    min_ratio: float = 0.5,
    loss_weights: Mapping[str, float] | None = None,
) -> Allocation:
    """Choose a rank per matrix so that the block-linear parameters shrink by at least ``target``.

    ``"loss"``-objective strategies go through :func:`allocate_by_loss` on the spectra's
    :func:`truncation_losses`, each scaled by ``loss_weights`` (the output sensitivities for ``sensitivity``
    strategies). The rest is about the ``"threshold"`` objective.

    The threshold is the smallest of the candidate scores whose parameter reduction reaches the target, found by
    bisection over the sorted scores (parameter reduction is non-decreasing in the threshold), so no matrix could
    keep one more direction without missing the budget. For ``fixed_threshold`` strategies (``"welore-table"``)
    the target is the paper's rank-reduction target and the threshold is looked up instead.

    Args:
        spectra: ``(min(m, n),)`` descending singular values per matrix (weighted for data-aware strategies).
        shapes: ``(m, n)`` per matrix.
        target: fraction of parameters to remove, in ``(0, 1)``.
        strategy: registered name or an :class:`AllocationStrategy`.
        min_ratio: LRC/N-LRC rule, see :func:`is_low_rank_component`.
        loss_weights: per-matrix factor on the truncation losses (``"loss"`` objective only; required by
            ``sensitivity`` strategies), finite and ``>= 0``.

    Returns:
        The allocation.

    Raises:
        ValueError: on bad arguments, or if the target cannot be reached even at rank 1 everywhere.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be a fraction in (0, 1), got {target}")
    if not 0.0 <= min_ratio < 1.0:
        raise ValueError(f"min_ratio must be in [0, 1), got {min_ratio}")
    if not spectra:
        raise ValueError("no spectra to allocate ranks for")
    if set(spectra) != set(shapes):
        raise ValueError("spectra and shapes must describe the same matrices")
    rule = get_strategy(strategy) if isinstance(strategy, str) else strategy
    for name, values in spectra.items():
        if values.numel() != min(shapes[name]):
            raise ValueError(f"{name}: {values.numel()} singular values for a {shapes[name]} matrix")
    params_before = sum(m * n for m, n in shapes.values())
    if rule.objective == "loss":
        return _allocate_loss_objective(spectra, shapes, target, rule, min_ratio, loss_weights, params_before)
    if loss_weights is not None:
        raise ValueError(f"loss_weights apply to 'loss'-objective strategies; {rule.name!r} uses a threshold")
    scores = {name: rule.score(values.detach().cpu(), tuple(shapes[name])) for name, values in spectra.items()}
    budget = (1.0 - target) * params_before

    def after(threshold: float) -> tuple[dict[str, int], int, dict[str, bool]]:
        proposed = _ranks_at(scores, threshold)
        total, lrc = _params_after(proposed, shapes, min_ratio)
        return proposed, total, lrc

    if rule.fixed_threshold is not None:
        threshold = float(rule.fixed_threshold(target))
    else:
        candidates = torch.unique(torch.cat(list(scores.values())))  # sorted ascending
        low, high = 0, candidates.numel() - 1
        if after(float(candidates[high]))[1] > budget:
            _, best, _ = after(float("inf"))
            raise ValueError(
                f"target {target:.3f} is out of reach: at rank 1 everywhere the reduction is only "
                f"{1 - best / params_before:.3f} (min_ratio={min_ratio})"
            )
        while low < high:  # smallest index whose parameter count fits the budget
            mid = (low + high) // 2
            if after(float(candidates[mid]))[1] <= budget:
                high = mid
            else:
                low = mid + 1
        threshold = float(candidates[low])
    proposed, params_after, lrc = after(threshold)
    ranks = {name: rank if lrc[name] else min(shapes[name]) for name, rank in proposed.items()}
    return Allocation(proposed, ranks, lrc, threshold, params_before, params_after)


def _allocate_loss_objective(
    spectra: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, int]],
    target: float,
    rule: AllocationStrategy,
    min_ratio: float,
    loss_weights: Mapping[str, float] | None,
    params_before: int,
) -> Allocation:
    if loss_weights is None:
        if rule.sensitivity:
            raise ValueError(
                f"strategy {rule.name!r} scales truncation losses by output sensitivity: pass loss_weights "
                "(compress_model measures them on the calibration set)"
            )
        loss_weights = dict.fromkeys(spectra, 1.0)
    missing = sorted(set(spectra) - set(loss_weights))
    if missing:
        raise ValueError(f"loss_weights miss {len(missing)} matrices, e.g. {missing[0]!r}")
    for name in spectra:
        weight = float(loss_weights[name])
        if not math.isfinite(weight) or weight < 0.0:
            raise ValueError(f"loss_weights[{name!r}] must be finite and >= 0, got {weight}")
    losses = {name: truncation_losses(values) * float(loss_weights[name]) for name, values in spectra.items()}
    budget = (1.0 - target) * params_before
    try:
        ranks, lrc, multiplier = allocate_by_loss(losses, shapes, budget, min_ratio)
    except ValueError as error:
        raise ValueError(f"target {target:.3f} is out of reach: {error}") from error
    params_after = sum(ranks[k] * sum(shapes[k]) if lrc[k] else shapes[k][0] * shapes[k][1] for k in ranks)
    return Allocation(dict(ranks), dict(ranks), lrc, multiplier, params_before, params_after)
