"""Model conversion: ``WeLoreConfig``, ``compress_model`` and ``mark_trainable``.

``compress_model`` works block by block (:mod:`lowrank_train.welore.blockwise`) and stages every replacement off
the model, swapping them in only at the end, so a failure half-way (bad calibration data, a factorization that
fails, running out of memory) leaves the model as it was, and peak memory is the model plus one block's work.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from lowrank_train.nn.lowrank_linear import LowRankLinear
from lowrank_train.nn.surgery import block_modules, is_dense_linear, replace_module
from lowrank_train.progress_bar import PhaseProgress
from lowrank_train.welore.allocation import (
    GUARD_FALLBACK,
    GUARDED,
    STRATEGIES,
    AllocationStrategy,
    allocate_ranks,
    get_strategy,
    guard_candidates,
)
from lowrank_train.welore.blockwise import (
    STAGING_LOCATIONS,
    BlockPlan,
    FactorStaging,
    block_statistics,
    chain_mismatch,
    plan_blocks,
)
from lowrank_train.welore.generation import generated_count, mix_generated_calibration
from lowrank_train.welore.guard import GuardReport, heldout_loss, split_calibration
from lowrank_train.welore.sensitivity import collect_output_sensitivity
from lowrank_train.welore.spectrum import (
    InputStatistics,
    collect_input_statistics,
    compute_spectra,
    find_block_linears,
    limit_threads,
    load_spectra_cache,
    model_fingerprint,
    prepare_calibration,
    save_spectra_cache,
    truncated_factors,
    whitening_factor,
)

__all__ = [
    "PHASES",
    "TRAINABLE_MODES",
    "CompressionReport",
    "MatrixReport",
    "WeLoreConfig",
    "compress_model",
    "mark_trainable",
    "replace_module",
]

TRAINABLE_MODES = ("lrc", "all", "lrc+galore")
# compress_model's phases, in the order they run (the guard's held-out evaluation follows each candidate's factors);
# CompressionReport.phase_seconds has one entry per phase, 0.0 for one that did not run.
PHASES = ("calibration", "generation", "sensitivity", "spectra", "allocation", "factors", "guard")
# Input statistics from fewer tokens are noise: one token gave a rank-1 second moment that the damping ridge
# alone made invertible, and "whitened" compressed against it without a word (issue 20).
MIN_CALIBRATION_TOKENS = 64
_SHOWN_NAMES = 4  # matrices named in a message before "and N more"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeLoreConfig:
    """How to compress a model.

    Attributes:
        target: fraction of the block-linear parameters to remove, in ``(0, 1)``. For ``"welore-table"`` it is the
            paper's rank-reduction target (its tau table is indexed by that), in ``[0.1, 0.7]``.
        strategy: allocation strategy name, see :data:`lowrank_train.welore.allocation.STRATEGIES`, or the
            default ``"auto"``: the held-out guard (:mod:`lowrank_train.welore.guard`) compresses with each guard
            candidate (``"whitened-loss"``, ``"whitened"``) on four fifths of the calibration sequences and keeps
            the one with the smallest loss on the rest (each rule wins on some model family, issue 23); with
            precomputed statistics or too few sequences it uses ``"whitened-loss"`` unguarded. A strategy name
            forces that rule; ``"welore"`` is the paper's data-free rule.
        min_ratio: a matrix is factorized (LRC) only if it loses at least this fraction of its rank (paper: 0.5).
        damping: ridge added to the input second moment before whitening, relative to its mean diagonal.
        shrinkage: fraction of the input second moment moved to its diagonal before whitening; ``None`` uses the
            strategy's own (0.1 for ``"whitened-loss"``, 0 for the others).
        generated_fraction: share of calibration tokens the model generates itself, mixed into a token-id
            calibration set (not into precomputed statistics); ``None`` uses the strategy's own (1/3 for
            ``"whitened-loss"``, 0 for the others).
        asvd_alpha: exponent of ASVD's channel scale ``E[|x|]^alpha``.
        num_threads: torch threads for SVDs and the calibration pass (``None``: leave as is).
        cache_path: optional safetensors file caching singular values across runs.
        staging: where finished blocks' factors wait until every block is done: ``"memory"`` (CPU tensors),
            ``"disk"`` (one safetensors file per block, at most the compressed layers' size in all) or ``"auto"``
            (disk for a model on the CPU, where memory staging would hold every replacement next to the model;
            CPU memory for a model on an accelerator).
        staging_dir: folder for the disk staging's temporary files (``None``: the system's temporary directory).
        guard_refit: under ``"auto"``, compress once more with the winning rule on *all* the calibration sequences
            (the result then equals forcing that rule; costs one more compression) instead of keeping the winner
            as fitted on four fifths of them.
    """

    target: float
    strategy: str = GUARDED
    min_ratio: float = 0.5
    damping: float = 1e-3
    shrinkage: float | None = None
    generated_fraction: float | None = None
    asvd_alpha: float = 0.5
    num_threads: int | None = 1
    cache_path: str | None = None
    staging: str = "auto"
    staging_dir: str | None = None
    guard_refit: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target must be a fraction of parameters to remove in (0, 1), got {self.target}")
        if self.strategy not in STRATEGIES and self.strategy != GUARDED:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; choose {GUARDED!r} (guarded default) or one of "
                f"{sorted(STRATEGIES)}"
            )
        if not 0.0 <= self.min_ratio < 1.0:
            raise ValueError(f"min_ratio must be in [0, 1), got {self.min_ratio}")
        if self.damping < 0.0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.shrinkage is not None:
            if not 0.0 <= self.shrinkage <= 1.0:
                raise ValueError(f"shrinkage must be in [0, 1] or None, got {self.shrinkage}")
            names = guard_candidates() if self.strategy == GUARDED else (self.strategy,)
            if self.shrinkage > 0.0 and any(STRATEGIES[name].weighting != "whiten" for name in names):
                raise ValueError(f"shrinkage applies to whitening strategies, not {self.strategy!r}")
        if self.generated_fraction is not None and not 0.0 <= self.generated_fraction < 1.0:
            raise ValueError(f"generated_fraction must be in [0, 1) or None, got {self.generated_fraction}")
        if self.asvd_alpha <= 0.0:
            raise ValueError(f"asvd_alpha must be > 0, got {self.asvd_alpha}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        if self.staging not in STAGING_LOCATIONS:
            raise ValueError(f"staging must be one of {STAGING_LOCATIONS}, got {self.staging!r}")


def _aligned(rows: list[list[str]]) -> str:
    """Rows of cells as a text table: names (the first column) left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


@dataclass(frozen=True)
class MatrixReport:
    """One block linear after compression.

    Attributes:
        name: qualified module name.
        shape: ``(out, in)``.
        full_rank: ``min(out, in)``.
        proposed_rank: rank the strategy proposed.
        rank: rank in the compressed model (``full_rank`` when dense).
        lrc: factorized (Low-Rank Component) or kept dense (N-LRC).
        params_before: ``out * in``.
        params_after: ``rank * (out + in)`` for an LRC, else ``out * in`` (biases not counted).
        calibration_energy: share of the layer's output energy on the calibration inputs that the compressed
            layer keeps, ``1 - E||(W - A B) x||^2 / E||W x||^2`` (1.0 when dense); ``None`` without calibration
            statistics (data-free strategies).
    """

    name: str
    shape: tuple[int, int]
    full_rank: int
    proposed_rank: int
    rank: int
    lrc: bool
    params_before: int
    params_after: int
    calibration_energy: float | None = None


@dataclass(frozen=True)
class CompressionReport:
    """What ``compress_model`` did; totals are over the block linears only.

    Attributes:
        strategy: allocation strategy name.
        target: requested target.
        threshold: the score threshold used (``tau`` for the WeLore rules).
        min_ratio: LRC/N-LRC rule used.
        matrices: one entry per block linear, in module order.
        guard: what the held-out guard measured (``strategy="auto"``); ``None`` when a strategy was forced.
        phase_seconds: seconds spent in each of :data:`PHASES` (summed over the guard's candidates); left out of
            ``==``, which compares what was compressed.
    """

    strategy: str
    target: float
    threshold: float
    min_ratio: float
    matrices: tuple[MatrixReport, ...] = field(default_factory=tuple)
    guard: GuardReport | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict, compare=False)  # timings: not what was done

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.matrices)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.matrices)

    @property
    def param_reduction(self) -> float:
        """Fraction of block-linear parameters removed."""
        return 1.0 - self.params_after / self.params_before

    @property
    def rank_reduction(self) -> float:
        """Fraction of the summed full ranks removed in the compressed model."""
        return 1.0 - sum(m.rank for m in self.matrices) / sum(m.full_rank for m in self.matrices)

    @property
    def proposed_rank_reduction(self) -> float:
        """Rank reduction the strategy's rule proposed, before the LRC/N-LRC split (the paper's number)."""
        return 1.0 - sum(m.proposed_rank for m in self.matrices) / sum(m.full_rank for m in self.matrices)

    @property
    def num_lrc(self) -> int:
        return sum(m.lrc for m in self.matrices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict with the per-matrix entries and the totals."""
        totals = {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_reduction": self.param_reduction,
            "rank_reduction": self.rank_reduction,
            "proposed_rank_reduction": self.proposed_rank_reduction,
            "num_lrc": self.num_lrc,
        }
        return {**asdict(self), "totals": totals, "by_type": self.by_type()}

    def by_type(self) -> dict[str, dict[str, Any]]:
        """Per matrix type (the last part of the name, e.g. ``"q_proj"``), in module order.

        Returns:
            Per type: ``matrices``, ``lrc`` and ``dense`` counts, ``ranks`` kept and ``full_ranks`` (one per
            matrix), ``mean_rank``, ``params_before`` / ``params_after``, and ``calibration_energy``, the smallest
            and the mean share of output energy kept (``{"min": ..., "mean": ...}``; ``None`` without calibration).
        """
        types: dict[str, dict[str, Any]] = {}
        energies: dict[str, list[float]] = {}
        for m in self.matrices:
            kind = m.name.rsplit(".", 1)[-1]
            entry = types.setdefault(
                kind,
                {
                    "matrices": 0,
                    "lrc": 0,
                    "dense": 0,
                    "ranks": [],
                    "full_ranks": [],
                    "params_before": 0,
                    "params_after": 0,
                },
            )
            entry["matrices"] += 1
            entry["lrc" if m.lrc else "dense"] += 1
            entry["ranks"].append(m.rank)
            entry["full_ranks"].append(m.full_rank)
            entry["params_before"] += m.params_before
            entry["params_after"] += m.params_after
            if m.calibration_energy is not None:
                energies.setdefault(kind, []).append(m.calibration_energy)
        for kind, entry in types.items():
            entry["mean_rank"] = sum(entry["ranks"]) / len(entry["ranks"])
            kept = energies.get(kind)
            entry["calibration_energy"] = {"min": min(kept), "mean": sum(kept) / len(kept)} if kept else None
        return types

    def table(self) -> str:
        """A table per matrix type: LRC and dense counts, ranks kept, parameters kept, calibration energy kept."""
        header = [
            "type",
            "matrices",
            "LRC",
            "dense",
            "rank kept: mean (min-max) / full",
            "params kept",
            "calibration energy: min / mean",
        ]
        rows = [header]
        for kind, entry in self.by_type().items():
            ranks, full = entry["ranks"], entry["full_ranks"]
            full_text = str(min(full)) if min(full) == max(full) else f"{min(full)}-{max(full)}"
            energy = entry["calibration_energy"]
            rows.append(
                [
                    kind,
                    str(entry["matrices"]),
                    str(entry["lrc"]),
                    str(entry["dense"]),
                    f"{entry['mean_rank']:.0f} ({min(ranks)}-{max(ranks)}) / {full_text}",
                    f"{entry['params_after'] / entry['params_before']:.1%}",
                    "-" if energy is None else f"{energy['min']:.3f} / {energy['mean']:.3f}",
                ]
            )
        return _aligned(rows)

    def matrix_table(self) -> str:
        """A table per matrix, in module order: shape, rank kept / full, LRC or dense, parameters kept, calibration
        energy kept (``compress --per-matrix``)."""
        header = ["matrix", "shape", "rank kept / full", "kind", "params kept", "calibration energy"]
        rows = [header]
        for m in self.matrices:
            rows.append(
                [
                    m.name,
                    f"{m.shape[0]} x {m.shape[1]}",
                    f"{m.rank} / {m.full_rank}",
                    "LRC" if m.lrc else "dense",
                    f"{m.params_after / m.params_before:.1%}",
                    "-" if m.calibration_energy is None else f"{m.calibration_energy:.3f}",
                ]
            )
        return _aligned(rows)

    def summary(self) -> str:
        """One line: strategy, target, achieved parameter and rank reduction, number of LRCs."""
        energies = [m.calibration_energy for m in self.matrices if m.calibration_energy is not None]
        energy = f", calibration energy kept >= {min(energies):.3f}" if energies else ""
        return (
            f"{self.strategy}: target {self.target:.2f}, threshold {self.threshold:.4g}, param reduction "
            f"{self.param_reduction:.3f}, rank reduction {self.rank_reduction:.3f} (proposed "
            f"{self.proposed_rank_reduction:.3f}), LRC {self.num_lrc}/{len(self.matrices)}{energy}"
        )


def asvd_scale(mean_abs: Tensor, alpha: float) -> Tensor:
    """ASVD's channel scale ``E[|x_j|]^alpha``, floored so that dead channels stay invertible.

    Args:
        mean_abs: ``(in,)`` mean absolute input per channel.
        alpha: exponent (ASVD uses 0.5).

    Returns:
        ``(in,)`` float32 positive scales.
    """
    floor = 1e-6 * float(mean_abs.max()) if mean_abs.numel() else 1e-6
    return mean_abs.clamp_min(max(floor, 1e-12)).pow(alpha).float()


def _statistics_key(stats: Mapping[str, InputStatistics], names: Mapping[str, object]) -> str:
    # Identifies the calibration data for the spectra cache; diagonals and channel means are enough to tell
    # calibration sets apart without hashing every full second-moment matrix.
    digest = hashlib.sha256()
    for name in names:
        entry = stats[name]
        digest.update(f"{name}:{entry.num_tokens};".encode())
        digest.update(entry.second_moment.diagonal().double().cpu().numpy().tobytes())
        digest.update(entry.mean_abs.double().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _input_vocab_size(model: nn.Module) -> int:
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if isinstance(embedding, nn.Embedding):
        return embedding.num_embeddings
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise ValueError("cannot check calibration token ids: the model has no nn.Embedding")
    return embeddings[0].num_embeddings


def _calibration_energy(linear: nn.Linear, layer: LowRankLinear | None, stats: InputStatistics) -> float:
    # E||W x||^2 = tr(W S W^T) with S = E[x x^T]; the unshrunk S, so that the number is about the calibration data.
    if layer is None:
        return 1.0
    moment = stats.second_moment.to(linear.weight.device, torch.float64)
    weight = linear.weight.detach().double()
    error = weight - layer.merged_weight().double()
    total = float(((weight @ moment) * weight).sum())
    lost = float(((error @ moment) * error).sum())
    return 1.0 - lost / total if total > 0 else 1.0


def _calibration_key(model: nn.Module, linears: Mapping[str, nn.Linear], sequences: Sequence[Tensor]) -> str:
    # Identifies token calibration for the spectra cache before any statistic exists: the token ids and every
    # tensor outside the block linears' weights (embeddings, norms, biases), which shape the statistics too (the
    # block weights are in the cache's fingerprint).
    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(f"{seq.shape[-1]};".encode())
        digest.update(seq.detach().cpu().long().numpy().tobytes())
    block_weights = {id(linear.weight) for linear in linears.values()}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in block_weights:
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"tokens-{digest.hexdigest()[:16]}"


def _check_not_compressed(model: nn.Module) -> None:
    # A compressed model's N-LRCs are still dense: compressing it again would silently re-split only those.
    found = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    if found:
        raise ValueError(
            f"the model is already compressed: it holds {len(found)} LowRankLinear layers (e.g. {found[0]!r}). "
            "compress_model starts from the dense model; compress that one at the new target (or merge the "
            "LowRankLinear layers back with LowRankLinear.merge first)"
        )


def _check_finite_weights(model: nn.Module) -> None:
    # A NaN/Inf weight failed deep inside eigh, the Cholesky factor or the sampler, naming no matrix (issue 20).
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.device.type != "meta":
            by_device.setdefault(param.device, []).append((name, param))
    bad = []
    with torch.no_grad():
        for named in by_device.values():  # one host synchronisation per device
            finite = torch.stack([torch.isfinite(param).all() for _, param in named]).tolist()
            bad += [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
    if bad:
        more = f" and {len(bad) - _SHOWN_NAMES} more" if len(bad) > _SHOWN_NAMES else ""
        verb = "holds" if len(bad) == 1 else "hold"
        raise ValueError(
            f"cannot compress: {', '.join(bad[:_SHOWN_NAMES])}{more} {verb} NaN/Inf values; WeLore cannot "
            "factorize or calibrate a non-finite model. Load a finite checkpoint (the one saved before training "
            "diverged)"
        )


def _check_calibration_size(strategy_name: str, num_tokens: int, widest: int) -> None:
    if num_tokens < MIN_CALIBRATION_TOKENS:
        raise ValueError(
            f"strategy {strategy_name!r} measures each layer's input statistics and needs at least "
            f"{MIN_CALIBRATION_TOKENS} calibration tokens, got {num_tokens}. Pass a few dozen sequences; fewer "
            f"tokens than a layer's input width ({widest} at most here) leave its statistics rank-deficient"
        )


def _calibration_source(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    plan: Sequence[BlockPlan],
    strategy: AllocationStrategy,
    config: WeLoreConfig,
    calibration: Tensor | Sequence[Tensor] | Mapping[str, InputStatistics] | None,
    progress: PhaseProgress,
) -> tuple[list[Tensor] | dict[str, InputStatistics] | None, str, dict[str, float] | None]:
    # What the block passes read their statistics from (token sequences for a CalibrationChain, or statistics
    # already in memory), the calibration's key for the spectra cache, and the loss weights (output sensitivity).
    if not strategy.needs_calibration:
        return None, "", None
    if calibration is None:
        raise ValueError(f"strategy {config.strategy!r} is data-aware and needs a calibration set")
    widest = max(linear.in_features for linear in linears.values())
    if isinstance(calibration, Mapping):
        stats = dict(calibration)
        missing = sorted(set(linears) - set(stats))
        if missing:
            raise ValueError(f"calibration statistics miss {len(missing)} block linears, e.g. {missing[0]!r}")
        _check_calibration_size(config.strategy, min(stats[n].num_tokens for n in linears), widest)
        loss_weights = None
        if strategy.sensitivity:
            unmeasured = sorted(n for n in linears if stats[n].output_sensitivity is None)
            if unmeasured:
                raise ValueError(
                    f"strategy {config.strategy!r} needs output sensitivities; {len(unmeasured)} statistics "
                    f"lack them (e.g. {unmeasured[0]!r}): collect them with "
                    "lowrank_train.welore.collect_calibration_statistics"
                )
            loss_weights = {n: float(stats[n].output_sensitivity) for n in linears}
        return stats, _statistics_key(stats, linears), loss_weights
    with progress.phase("calibration"):
        sequences = prepare_calibration(calibration, _input_vocab_size(model))
        _check_calibration_size(config.strategy, sum(seq.numel() for seq in sequences), widest)
        device = next(model.parameters()).device
        sequences = [seq.to(device) for seq in sequences]
    generated = config.generated_fraction if config.generated_fraction is not None else strategy.generated_fraction
    count, seq_len = generated_count(sequences, generated)
    if count:
        # The bar counts sampling steps: each step adds one token to every generated sequence.
        note = f"{count} sequence{'s' if count != 1 else ''} of {seq_len} tokens"
        with progress.phase("generation", seq_len - 1, "steps", note) as advance:
            sequences = mix_generated_calibration(
                model, sequences, generated, num_threads=config.num_threads, on_token=advance
            )
    loss_weights = None
    if strategy.sensitivity:
        # One scalar per layer (a forward and backward per sequence, no parameter gradients): small at any size.
        with progress.phase("sensitivity", len(sequences), "sequences") as advance:
            loss_weights = collect_output_sensitivity(model, linears, sequences, config.num_threads, advance)
    key = _calibration_key(model, linears, sequences)
    reason = chain_mismatch(model, [entry.block for entry in plan], max(sequences, key=lambda s: s.shape[-1]))
    if reason is not None:
        whole, block = _statistics_bytes(plan)
        warnings.warn(
            f"compress_model: {reason}, so the blocks cannot be calibrated one at a time; measuring the whole "
            f"model at once instead, with every block linear's statistics in memory: up to {whole / 2**30:.3g} GiB "
            f"of float64 second moments at once instead of {block / 2**30:.3g} GiB (the largest block's)",
            stacklevel=3,
        )
        return collect_input_statistics(model, linears, sequences, config.num_threads), key, loss_weights
    return sequences, key, loss_weights


def _statistics_bytes(plan: Sequence[BlockPlan]) -> tuple[int, int]:
    # Upper bounds on the float64 second moments alive: every block's at once, and the largest block's alone
    # (layers that share an input share one, so the true figures can be smaller).
    per_block = [sum(8 * lin.in_features**2 for lin in entry.linears.values()) for entry in plan]
    return sum(per_block), max(per_block, default=0)


def _weightings(
    strategy: AllocationStrategy, config: WeLoreConfig, stats: Mapping[str, InputStatistics] | None
) -> dict[str, dict[str, Tensor]] | None:
    # Per linear, the keyword arguments of weighted_matrix / truncated_factors; layers that share an input (the
    # same statistics tensor) share one whitening factor.
    if stats is None or strategy.weighting == "none":
        return None
    if strategy.weighting == "scale":
        # ASVD: scale channel j by E|x_j|^alpha; the floor keeps dead channels invertible.
        return {n: {"input_scale": asvd_scale(s.mean_abs, config.asvd_alpha)} for n, s in stats.items()}
    shrinkage = config.shrinkage if config.shrinkage is not None else strategy.shrinkage
    factors: dict[int, Tensor] = {}
    weightings = {}
    for name, entry in stats.items():
        key = id(entry.second_moment)
        if key not in factors:
            factors[key] = whitening_factor(entry.second_moment, config.damping, shrinkage)
        weightings[name] = {"whitening": factors[key]}
    return weightings


def _spectrum_kind(strategy: AllocationStrategy, config: WeLoreConfig, key: str) -> str:
    if strategy.weighting == "whiten":
        shrinkage = config.shrinkage if config.shrinkage is not None else strategy.shrinkage
        shrunk = f"shrink{shrinkage:g}:" if shrinkage > 0.0 else ""  # unshrunk keys match older caches
        return f"whiten:{config.damping:g}:{shrunk}{key}"
    if strategy.weighting == "scale":
        return f"scale:{config.asvd_alpha:g}:{key}"
    return "plain"


def _swap_in(
    model: nn.Module, plan: Sequence[BlockPlan], staging: FactorStaging, dense_out: dict[str, nn.Linear] | None
) -> None:
    # Block by block: load the staged factors, swap them in, drop the dense layer (the plan holds the last
    # reference that compress_model keeps), so the model never holds more than one block's replacements extra.
    # The guard passes dense_out to keep the dense layers, to put them back after measuring a candidate.
    staged = set(staging.keys())
    swapped: list[str] = []
    try:
        for entry in plan:
            if entry.name not in staged:
                continue
            device = next(iter(entry.linears.values())).weight.device
            tensors = staging.take(entry.name, device)
            for name in [n for n in entry.linears if f"{n}.factor_out" in tensors]:
                linear = entry.linears.pop(name)
                layer = LowRankLinear.from_factors(
                    linear, tensors.pop(f"{name}.factor_out"), tensors.pop(f"{name}.factor_in")
                )
                replace_module(model, name, layer)
                swapped.append(name)
                if dense_out is not None:
                    dense_out[name] = linear
                del linear, layer
    except Exception as error:
        if swapped:
            error.add_note(
                f"compress_model failed while swapping in factors it had computed and checked: {len(swapped)} "
                f"layers (the last {swapped[-1]!r}) are already low-rank, the rest are dense"
            )
        raise


@torch.no_grad()
def compress_model(
    model: nn.Module,
    config: WeLoreConfig,
    calibration: Tensor | Sequence[Tensor] | Mapping[str, InputStatistics] | None = None,
    *,
    progress: bool | PhaseProgress = False,
) -> CompressionReport:
    """Replace the block linears selected by the allocation with :class:`LowRankLinear` layers, in place.

    Everything runs block by block (issue 14; :mod:`lowrank_train.welore.blockwise`), in two passes, because the
    ranks depend on every matrix's spectrum:

    1. for each block: its linears' input statistics (calibration activations pushed through one block at a
       time), their whitening or scaling, the (weighted) spectra; then the block's statistics are freed. The
       spectra (``min(m, n)`` numbers per matrix) are all that is kept, and the ``cache_path`` file can supply
       them instead.
    2. ranks are allocated from all spectra, then for each block again: statistics, weighting, the factors of
       its Low-Rank Components at their ranks, staged off the model (``config.staging``).

    Only after every block succeeded are the staged factors swapped in, block by block, so peak memory is the
    model plus about one block's working set (its float64 statistics, weighting factors and one
    factorization), and a failure half-way leaves the model as it was. The results equal a whole-model pass
    (the blocks see the same inputs, the dense model's), up to the factorization's rounding.

    Under the default ``strategy="auto"`` the held-out guard (:mod:`lowrank_train.welore.guard`) runs this once per
    guard candidate on the first four fifths of the calibration sequences: each candidate's factors are swapped in,
    its mean token loss on the held-out fifth measured, and the dense layers (kept aside) put back exactly; the
    winner's low-rank layers go in at the end, so the model equals compressing with the winner forced on the
    fitting sequences. During the guard, peak memory adds the factors of two candidates (the best so far and the
    current one). Precomputed statistics or too few sequences fall back on ``"whitened-loss"``, with a warning.

    Args:
        model: a causal LM (any module whose transformer blocks sit in an ``nn.ModuleList``).
        config: target, strategy and numerics.
        calibration: token ids for data-aware strategies: a ``(num_sequences, seq_len)`` tensor or a list of
            ``(seq_len,)`` tensors (a few dozen sequences suffice), or the statistics that
            :func:`~lowrank_train.welore.sensitivity.collect_calibration_statistics` (or, for strategies that
            need no output sensitivity, ``collect_input_statistics``) returned for this model, to compress at
            several targets with one calibration pass (they are all in memory already; the passes hand them out
            block by block). Ignored by data-free strategies.
        progress: show each phase (:data:`PHASES`): ``True`` draws a tqdm bar per phase in a terminal and prints
            plain lines with an ETA elsewhere (:mod:`lowrank_train.progress_bar`); a
            :class:`~lowrank_train.progress_bar.PhaseProgress` chooses the stream or log function. Nothing is
            shown per matrix (the ``logging`` debug level has per-block seconds).

    Returns:
        Per-matrix ranks, LRC/N-LRC, and parameter totals; under ``"auto"``, the guard's losses, winner and margin;
        the seconds of each phase (``phase_seconds``).

    Raises:
        ValueError: a model already compressed, no block linears, a NaN/Inf weight (naming it), missing, empty,
            too small (under :data:`MIN_CALIBRATION_TOKENS` tokens) or out-of-vocabulary calibration data, a spectra
            cache from a different model, or an unreachable target. The model is unchanged in every error case.
        TypeError: ``config`` is not a :class:`WeLoreConfig` (e.g. a plain dict).
    """
    if not isinstance(config, WeLoreConfig):
        example = f"WeLoreConfig(**{dict(config)!r})" if isinstance(config, Mapping) else "WeLoreConfig(target=0.5)"
        raise TypeError(f"compress_model takes a WeLoreConfig as config, got {type(config).__name__}: pass {example}")
    _check_not_compressed(model)
    find_block_linears(model)  # raises when there is none
    _check_finite_weights(model)
    phases = progress if isinstance(progress, PhaseProgress) else PhaseProgress(enabled=bool(progress))
    before = dict(phases.seconds)  # a PhaseProgress shared with the caller may hold its own phases already
    if config.strategy != GUARDED:
        report = _compress_with(model, config, calibration, phases)
    else:
        report = _guarded_compress(model, config, calibration, phases)
    seconds = {name: phases.seconds.get(name, 0.0) - before.get(name, 0.0) for name in PHASES}
    return replace(report, phase_seconds=seconds)


def _guard_split(
    model: nn.Module, calibration: Tensor | Sequence[Tensor] | Mapping[str, InputStatistics] | None
) -> tuple[tuple[list[Tensor], list[Tensor]] | None, str]:
    # The fitting and held-out sequences (on the model's device), or None and why the guard cannot run.
    if calibration is None or isinstance(calibration, Mapping):
        what = "no calibration set" if calibration is None else "precomputed statistics (no token sequences)"
        return None, f"{what}: nothing to hold out"
    sequences = prepare_calibration(calibration, _input_vocab_size(model))
    split = split_calibration(sequences)
    fit_tokens = sum(seq.numel() for seq in split[0]) if split is not None else 0
    if split is None or fit_tokens < MIN_CALIBRATION_TOKENS:
        return None, (
            f"{len(sequences)} calibration sequences are too few to hold a fifth out and still fit on "
            f"{MIN_CALIBRATION_TOKENS} tokens; pass a few dozen sequences to let it compare the candidates"
        )
    device = next(model.parameters()).device
    fit, heldout = split
    return ([seq.to(device) for seq in fit], [seq.to(device) for seq in heldout]), ""


def _put_back(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    for name, layer in layers.items():
        replace_module(model, name, layer)


def _guarded_compress(
    model: nn.Module,
    config: WeLoreConfig,
    calibration: Tensor | Sequence[Tensor] | Mapping[str, InputStatistics] | None,
    progress: PhaseProgress,
) -> CompressionReport:
    # Each candidate is compressed on the fitting sequences and swapped in (its dense layers kept off the model),
    # scored on the held-out ones, then the dense layers go back; the best candidate's low-rank layers are kept
    # and swapped in at the end. Peak: the model plus the factors of two candidates plus one block's working set.
    start = time.perf_counter()
    with progress.phase("calibration"):
        split, reason = _guard_split(model, calibration)
    if split is None:
        message = f"compress_model: the held-out guard cannot run ({reason}); using {GUARD_FALLBACK!r} unguarded"
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
        report = _compress_with(model, replace(config, strategy=GUARD_FALLBACK), calibration, progress)
        guard = GuardReport(winner=GUARD_FALLBACK, seconds=time.perf_counter() - start, fallback=reason)
        return replace(report, guard=guard)
    fit, heldout = split
    was_training = model.training
    model.eval()
    losses: dict[str, float] = {}
    best: tuple[str, CompressionReport, dict[str, nn.Module]] | None = None
    dense: dict[str, nn.Linear] = {}
    try:
        candidates = guard_candidates()
        for number, name in enumerate(candidates, 1):
            dense = {}
            progress.message(f"guard: candidate {number}/{len(candidates)} {name}")
            report = _compress_with(model, replace(config, strategy=name), fit, progress, dense)
            with progress.phase("guard"):
                losses[name] = heldout_loss(model, heldout)
            logger.debug("guard: %s held-out loss %.4f", name, losses[name])
            progress.message(f"guard: {name} held-out loss {losses[name]:.4f}")
            if best is None or losses[name] < losses[best[0]]:
                best = (name, report, {n: model.get_submodule(n) for n in dense})
            _put_back(model, dense)
            dense = {}
    except BaseException:
        _put_back(model, dense)  # the model is dense again, as it came
        raise
    finally:
        model.train(was_training)
    if best is None:
        raise ValueError("no strategy is registered as a guard candidate (AllocationStrategy.guard_candidate)")
    winner, report, layers = best
    if config.guard_refit:
        # The held-out fifth chose the rule; the rule is then fitted on every sequence, as forcing it would.
        best = layers = None  # the fitted candidate's factors go before the refit builds new ones
        progress.message(f"guard: refitting {winner} on all {len(fit) + len(heldout)} calibration sequences")
        report = _compress_with(model, replace(config, strategy=winner), [*fit, *heldout], progress)
    else:
        _put_back(model, layers)
    others = [loss for name, loss in losses.items() if name != winner]
    guard = GuardReport(
        losses=losses,
        winner=winner,
        margin=min(others) - losses[winner] if others else None,
        seconds=time.perf_counter() - start,
        fit_sequences=len(fit),
        heldout_sequences=len(heldout),
        refit=config.guard_refit,
    )
    return replace(report, guard=guard)


def _compress_with(
    model: nn.Module,
    config: WeLoreConfig,
    calibration: Tensor | Sequence[Tensor] | Mapping[str, InputStatistics] | None,
    progress: PhaseProgress,
    dense_out: dict[str, nn.Linear] | None = None,
) -> CompressionReport:
    # compress_model with one forced strategy; dense_out receives the dense layers it swapped out.
    strategy = get_strategy(config.strategy)
    linears = find_block_linears(model)
    shapes = {name: (lin.out_features, lin.in_features) for name, lin in linears.items()}
    plan = plan_blocks(model, linears)
    device = next(iter(linears.values())).weight.device
    location = config.staging if config.staging != "auto" else ("disk" if device.type == "cpu" else "memory")
    was_training = model.training
    model.eval()
    try:
        with limit_threads(config.num_threads):
            source, key, loss_weights = _calibration_source(
                model, linears, plan, strategy, config, calibration, progress
            )
            kind = _spectrum_kind(strategy, config, key)
            spectra = None
            fingerprint = ""
            if config.cache_path is not None:
                fingerprint = model_fingerprint(linears)
                spectra = load_spectra_cache(config.cache_path, fingerprint, kind)
                if spectra is not None and set(spectra) != set(linears):
                    spectra = None  # written for another set of layers of the same weights: recompute
            if spectra is None:
                spectra = {}
                # A plain loop, not enumerate: enumerate's reused result tuple would keep the previous block's
                # statistics alive while the next block's are accumulated. A block's seconds include its
                # calibration forward and statistics, which the generator computes before handing it out.
                with progress.phase("spectra", len(plan), "blocks") as advance:
                    start = time.perf_counter()
                    for entry, stats in block_statistics(model, plan, source):
                        weightings = _weightings(strategy, config, stats)
                        del stats  # only the weighting is needed from here on
                        spectra.update(compute_spectra(entry.linears, weightings, config.num_threads))
                        del weightings
                        logger.debug("spectra of %s in %.1f s", entry.name, time.perf_counter() - start)
                        advance()
                        start = time.perf_counter()
                    if config.cache_path is not None:
                        save_spectra_cache(config.cache_path, fingerprint, kind, spectra)

            with progress.phase("allocation"):
                allocation = allocate_ranks(spectra, shapes, config.target, strategy, config.min_ratio, loss_weights)

            # A dense layer keeps all of its calibration energy (as _calibration_energy says).
            energies: dict[str, float] = dict.fromkeys(linears, 1.0) if source is not None else {}
            del linears  # from here on the plan holds the only references to the dense layers
            with (
                FactorStaging(location, config.staging_dir) as staging,
                progress.phase("factors", len(plan), "blocks") as advance,
            ):
                start = time.perf_counter()
                for entry, stats in block_statistics(model, plan, source, allocation.lrc):
                    energy_seconds = 0.0
                    weightings = _weightings(strategy, config, stats)
                    tensors: dict[str, Tensor] = {}
                    for name, linear in entry.linears.items():
                        if not allocation.lrc[name]:
                            continue
                        extra = weightings[name] if weightings is not None else {}
                        factor_out, factor_in = truncated_factors(linear.weight, allocation.ranks[name], **extra)
                        layer = LowRankLinear.from_factors(linear, factor_out, factor_in)
                        if stats is not None:
                            energy_start = time.perf_counter()
                            energies[name] = _calibration_energy(linear, layer, stats[name])
                            energy_seconds += time.perf_counter() - energy_start
                        tensors[f"{name}.factor_out"] = layer.factor_out
                        tensors[f"{name}.factor_in"] = layer.factor_in
                        del factor_out, factor_in, layer
                    if tensors:
                        staging.put(entry.name, tensors)
                    del stats, weightings, tensors
                    seconds = time.perf_counter() - start
                    logger.debug(
                        "factors of %s in %.1f s (calibration energy %.1f s)", entry.name, seconds, energy_seconds
                    )
                    advance()
                    start = time.perf_counter()
                staging.check()
                _swap_in(model, plan, staging, dense_out)
    finally:
        model.train(was_training)

    matrices = []
    for name, (m, n) in shapes.items():
        rank, lrc = allocation.ranks[name], allocation.lrc[name]
        matrices.append(
            MatrixReport(
                name=name,
                shape=(m, n),
                full_rank=min(m, n),
                proposed_rank=allocation.proposed[name],
                rank=rank,
                lrc=lrc,
                params_before=m * n,
                params_after=rank * (m + n) if lrc else m * n,
                calibration_energy=energies.get(name),
            )
        )
    return CompressionReport(config.strategy, config.target, allocation.threshold, config.min_ratio, tuple(matrices))


def mark_trainable(
    model: nn.Module,
    mode: str,
    galore_rank: int = 128,
    galore_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Freeze everything, then unfreeze the components ``mode`` trains; return optimizer param groups.

    Embeddings, the output head and norms always stay frozen (WeLore, Sec. 4).

    Modes:
        ``"lrc"``: only the factors (and biases) of the LowRankLinear layers: WeLore's LRC fine-tuning.
        ``"all"``: the LRCs and the dense block linears (N-LRCs).
        ``"lrc+galore"``: as ``"all"``, but the N-LRC weight matrices go into their own group carrying
            ``"rank": galore_rank`` (plus ``galore_options``) for a GaLore optimizer (``lowrank_train.optim``).

    Args:
        model: a model compressed by :func:`compress_model` (or loaded by ``load_compressed``).
        mode: one of :data:`TRAINABLE_MODES`.
        galore_rank: projection rank for the N-LRC group in ``"lrc+galore"`` mode.
        galore_options: extra keys for that group (e.g. ``{"update_gap": 200, "scale": 0.25}``).

    Returns:
        Param groups (``{"params": [...], "param_names": [...], ...}``), empty groups left out; they feed
        ``torch.optim`` optimizers and ``lowrank_train.optim.GaLore`` alike.

    Raises:
        ValueError: for an unknown mode, or ``"lrc"`` on a model without LowRankLinear layers.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {TRAINABLE_MODES}")
    if galore_rank < 1:
        raise ValueError(f"galore_rank must be >= 1, got {galore_rank}")
    lrc_params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            lrc_params.extend(module.parameters())
    if mode == "lrc" and not lrc_params:
        raise ValueError("the model has no LowRankLinear layers; run compress_model first or use mode='all'")
    dense_weights: list[nn.Parameter] = []
    dense_biases: list[nn.Parameter] = []
    if mode != "lrc":
        for module in block_modules(model, is_dense_linear).values():
            dense_weights.append(module.weight)
            if module.bias is not None:
                dense_biases.append(module.bias)

    for param in model.parameters():
        param.requires_grad_(False)
    for param in (*lrc_params, *dense_weights, *dense_biases):
        param.requires_grad_(True)

    names = {id(param): name for name, param in model.named_parameters()}

    def group(params: list[nn.Parameter], **options: Any) -> dict[str, Any]:
        # "param_names" lets lowrank_train.optim name a parameter in its error messages.
        return {"params": params, "param_names": [names[id(p)] for p in params], **options}

    if mode == "lrc+galore":
        groups = [
            group(lrc_params + dense_biases),
            group(dense_weights, rank=galore_rank, **dict(galore_options or {})),
        ]
    else:
        groups = [group(lrc_params + dense_weights + dense_biases)]
    return [group for group in groups if group["params"]]
