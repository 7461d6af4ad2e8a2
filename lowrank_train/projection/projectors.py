"""Projector kinds: how a rank-r basis is built for a (rows x cols) matrix.

Every builder works on the *oriented* gradient (see :mod:`lowrank_train.projection.ops`): the basis spans
its rows side, so left and right projections share one code path.

Exact bases come from an eigendecomposition of the float64 Gram matrix ``A A^T`` (rows x rows) rather than
from ``torch.linalg.svd``: the SVD also builds the (rows x cols) right factor that GaLore throws away, and its
bidiagonalization of the whole matrix is the slow part (issue 14 item 3). Forming the Gram squares the
condition number, which float64 absorbs: its eigenvectors are at least as accurate as an fp32 SVD's
(tests/projection/test_projectors.py checks both against a float64 SVD).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowrank_train._registry import Registry

BasisBuilder = Callable[..., torch.Tensor]
"""``build(matrix, rank, generator, **options) -> basis``: (rows, cols) in, (rows, rank) fp32 out."""

BatchedBasisBuilder = Callable[..., torch.Tensor]
"""``build_batched(matrices, rank, generators, **options) -> bases``: B (rows, cols) in, (B, rows, rank) out."""

# Columns converted to float64 at a time when a Gram matrix is formed: the transient copy stays rows x 1024
# (32 MiB at 4096 rows) instead of a float64 copy of the whole gradient.
_GRAM_CHUNK = 1024


Workspace = Callable[..., int]
"""``workspace(rows, cols, rank, **options) -> int``: fp32 elements one build holds besides its input and result."""


def _no_workspace(rows: int, cols: int, rank: int, **options: int) -> int:
    del rows, cols, rank, options
    return 0


@dataclass(frozen=True)
class ProjectorKind:
    """A registered way of building a projection basis, with the facts its users ask instead of its name.

    Attributes:
        name: registry key ("svd", "rsvd", "random", "identity").
        build: ``build(matrix, rank, generator, **options) -> basis``; ``matrix`` is (rows x cols), the result
            (rows x rank) fp32. Kinds that store their basis return orthonormal columns; "random" returns a scaled
            Gaussian whose columns are orthonormal in expectation (``E[P^T P] = I``).
        stores_basis: False when the basis is regenerated from a seed on every use, so nothing is stored.
        uses_gradient: False when the gradient's values are not read (random, identity): a refresh needs no
            factorization and no finite gradient.
        full_rank: the basis always spans the whole smaller side (rank ``min(m, n)`` whatever the group's
            ``rank``): a full-rank update, allowed for any 2-D weight (identity).
        options: the GaLore group options passed to ``build`` as keywords (``oversample``, ``power_iters``).
        workspace: ``workspace(rows, cols, rank, **options)``: fp32 elements a build holds transiently (its
            factorization's), for the memory estimator; the fp32 copy of a low-precision gradient is not included.
        build_batched: ``build_batched(matrices, rank, generators, **options) -> (B, rows, rank)``: the same bases
            as ``build`` for each matrix, with the factorizations done as one batched call. ``None``:
            :func:`build_bases_batched` calls ``build`` once per matrix.
    """

    name: str
    build: BasisBuilder
    stores_basis: bool = True
    uses_gradient: bool = True
    full_rank: bool = False
    options: tuple[str, ...] = ()
    workspace: Workspace = _no_workspace
    build_batched: BatchedBasisBuilder | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a projector name is a non-empty string, got {self.name!r}")
        if not callable(self.build):
            raise ValueError(f"projector {self.name!r}: build must be callable, got {self.build!r}")
        object.__setattr__(self, "options", tuple(self.options))

    def basis_rank(self, shape: Sequence[int], rank: int | None) -> int:
        """Basis columns for a weight of ``shape``: ``min(shape)`` for a full-rank kind, else ``rank``."""
        return min(shape) if self.full_rank else rank

    def build_options(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The keywords ``build`` takes, read from a param group (or any mapping holding them)."""
        return {key: group[key] for key in self.options}


PROJECTORS: Registry[ProjectorKind] = Registry("projector", ProjectorKind)


def register_projector(kind: ProjectorKind, *, replace: bool = False) -> ProjectorKind:
    """Adds ``kind`` to the registry under ``kind.name`` and returns it.

    Raises:
        ValueError: when the name is taken and ``replace`` is False, or ``kind`` is not a ProjectorKind.
    """
    return PROJECTORS.add(kind, replace=replace)


def projector_names() -> tuple[str, ...]:
    """Registered projector names, in registration order."""
    return PROJECTORS.names()


def get_projector(name: str) -> ProjectorKind:
    """Looks a projector kind up by name.

    Raises:
        ValueError: when ``name`` is not registered; the message lists the known names.
    """
    return PROJECTORS.lookup(name)


def build_bases_batched(
    kind: str | ProjectorKind,
    matrices: Sequence[torch.Tensor] | torch.Tensor,
    rank: int,
    generators: Sequence[torch.Generator | None] | None = None,
    **options: int,
) -> torch.Tensor:
    """Builds the bases of several same-shape matrices at once (e.g. a layer's q, k, v, o at a refresh).

    Each basis is the one ``kind.build(matrices[i], rank, generators[i], **options)`` returns (up to float
    rounding); the factorizations (eigendecompositions, QRs) run as one batched call. The matrices are never
    stacked into one tensor, so the transient memory is that of the per-matrix builds plus the batched
    (B x rows x rows) or (B x rows x rank) factors.

    Args:
        kind: projector name or kind.
        matrices: B oriented (rows, cols) matrices of one shape, as a sequence or a (B, rows, cols) tensor.
        rank: basis size.
        generators: one generator (or None) per matrix for the seeded kinds; None: no generators.
        **options: the kind's builder options (``oversample``, ``power_iters`` for "rsvd").

    Returns:
        (B, rows, rank) fp32 tensor; ``[i]`` is the basis of ``matrices[i]``.

    Raises:
        ValueError: when the matrices are empty, not 2-D, of different shapes, or the generators do not match
            them one for one.
    """
    kind = get_projector(kind) if isinstance(kind, str) else kind
    mats = list(matrices.unbind(0)) if isinstance(matrices, torch.Tensor) else list(matrices)
    if not mats:
        raise ValueError("build_bases_batched needs at least one matrix")
    for i, m in enumerate(mats):
        if m.dim() != 2 or m.shape != mats[0].shape:
            raise ValueError(
                f"build_bases_batched needs 2-D matrices of one shape: matrices[{i}] has shape {tuple(m.shape)}, "
                f"matrices[0] {tuple(mats[0].shape)}"
            )
    gens = [None] * len(mats) if generators is None else list(generators)
    if len(gens) != len(mats):
        raise ValueError(f"build_bases_batched got {len(gens)} generators for {len(mats)} matrices: pass one each")
    if kind.build_batched is None:
        return torch.stack([kind.build(m, rank, g, **options) for m, g in zip(mats, gens, strict=True)])
    return kind.build_batched(mats, rank, gens, **options)


def _check_rank(shape: torch.Size, rank: int, limit: int, projector: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be an integer in [1, {limit}] for a {shape[0]} x {shape[1]} matrix "
            f"({projector!r} projector), got {rank!r}"
        )


def _gram(matrix: torch.Tensor) -> torch.Tensor:
    """(rows, cols) -> (rows, rows) float64 ``A A^T``, converting ``_GRAM_CHUNK`` columns at a time."""
    rows, cols = matrix.shape
    gram = torch.zeros(rows, rows, dtype=torch.float64, device=matrix.device)
    for start in range(0, cols, _GRAM_CHUNK):
        block = matrix[:, start : start + _GRAM_CHUNK].to(torch.float64)
        gram.addmm_(block, block.mT)
    return gram


def _canonical_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flips each column so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign and LAPACK's choice is not part of any contract; fixing it here makes
    the basis a function of the subspace directions alone (same result from eigh, SVD, batched or not).
    """
    pivot = basis.gather(-2, basis.abs().argmax(dim=-2, keepdim=True))
    return basis * torch.where(pivot < 0, -1.0, 1.0).to(basis.dtype)


def _top_eigenvectors(grams: torch.Tensor, rank: int) -> torch.Tensor:
    """(..., d, d) symmetric float64 -> (..., d, rank) fp32 eigenvectors of the largest eigenvalues, descending."""
    _, vectors = torch.linalg.eigh(grams)  # ascending eigenvalues
    return _canonical_signs(vectors[..., -rank:].flip(-1)).float()


def _svd_bases(matrices: list[torch.Tensor], rank: int) -> torch.Tensor:
    rows, cols = matrices[0].shape
    _check_rank(matrices[0].shape, rank, min(rows, cols), "svd")
    if rows > cols:
        # Not oriented (GaLore always orients): the Gram of the rows side would be the larger one.
        u = torch.linalg.svd(torch.stack([m.float() for m in matrices]), full_matrices=False)[0]
        return _canonical_signs(u[..., :rank]).contiguous()
    return _top_eigenvectors(torch.stack([_gram(m) for m in matrices]), rank)


def svd_basis(matrix: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``matrix``: eigenvectors of its float64 Gram ``A A^T``.

    Costs O(rows^2 * cols) for the Gram plus O(rows^3) for the eigendecomposition, and never builds the
    (rows x cols) right singular factor; on one CPU core that is ~3x faster than ``torch.linalg.svd`` on wide
    LLaMA shapes (4096 x 11008: 35 vs 98 CPU-s) and about as fast on square ones
    (benchmarks/results/optimizer_step.md).

    Args:
        matrix: (rows, cols) tensor of any float dtype; rows <= cols is the fast path (GaLore orients).
        rank: number of singular vectors kept, 1 <= rank <= min(rows, cols).
        generator: unused; present for the common builder signature.

    Returns:
        (rows, rank) fp32 tensor with orthonormal columns, ordered by decreasing singular value, each column
        signed so that its largest-magnitude entry is positive.
    """
    del generator
    return _svd_bases([matrix], rank)[0]


def svd_bases_batched(
    matrices: Sequence[torch.Tensor], rank: int, generators: Sequence[torch.Generator | None] | None = None
) -> torch.Tensor:
    """:func:`svd_basis` of each matrix with one batched eigendecomposition; (B, rows, rank) fp32."""
    del generators
    return _svd_bases(list(matrices), rank)


def _rsvd_bases(
    matrices: list[torch.Tensor],
    rank: int,
    generators: Sequence[torch.Generator | None],
    oversample: int,
    power_iters: int,
) -> torch.Tensor:
    rows, cols = matrices[0].shape
    _check_rank(matrices[0].shape, rank, min(rows, cols), "rsvd")
    a = [m.float() for m in matrices]
    width = min(rank + oversample, rows, cols)
    # One Gaussian test matrix per input from its own generator, so a batch draws what single builds would.
    omegas = [
        torch.randn(cols, width, generator=g, device=m.device, dtype=torch.float32)
        for m, g in zip(a, generators, strict=True)
    ]
    q, _ = torch.linalg.qr(torch.stack([m @ o for m, o in zip(a, omegas, strict=True)]))
    for _ in range(power_iters):
        # Re-orthonormalizing between the two halves keeps small singular directions from underflowing.
        w, _ = torch.linalg.qr(torch.stack([m.mT @ qi for m, qi in zip(a, q, strict=True)]))
        q, _ = torch.linalg.qr(torch.stack([m @ wi for m, wi in zip(a, w, strict=True)]))
    # Rayleigh-Ritz on span(Q): left singular vectors of the small (width x cols) Q^T A, again from its
    # float64 Gram, which skips the (width x cols) right factor an SVD would build.
    small = _top_eigenvectors(torch.stack([_gram(qi.mT @ m) for m, qi in zip(a, q, strict=True)]), rank)
    return _canonical_signs(q @ small).contiguous()


def rsvd_basis(
    matrix: torch.Tensor,
    rank: int,
    generator: torch.Generator | None = None,
    *,
    oversample: int = 8,
    power_iters: int = 1,
) -> torch.Tensor:
    """Top-``rank`` left singular subspace by a randomized range finder (Halko et al. 2011, alg. 4.4).

    Cost is O(rows * cols * (rank + oversample)) instead of the O(rows^2 * cols) of an exact basis, which is
    what makes refreshes affordable for 4096 x 11008 weights.

    Args:
        matrix: (rows, cols) tensor.
        rank: basis size, 1 <= rank <= min(rows, cols).
        generator: drives the Gaussian test matrix, so a refresh is reproducible.
        oversample: extra sketch columns; improves accuracy when the spectrum decays slowly.
        power_iters: subspace iterations; each sharpens the spectral gap at the cost of two matmuls and two QRs.
            One is the default: on a 4096 x 11008 gradient at rank 1024 it keeps >99% of the gradient energy
            the exact basis captures (benchmarks/optimizer_step.py).

    Returns:
        (rows, rank) fp32 tensor with orthonormal columns, signed as :func:`svd_basis`'s.
    """
    return _rsvd_bases([matrix], rank, [generator], oversample, power_iters)[0]


def rsvd_bases_batched(
    matrices: Sequence[torch.Tensor],
    rank: int,
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    oversample: int = 8,
    power_iters: int = 1,
) -> torch.Tensor:
    """:func:`rsvd_basis` of each matrix (``generators[i]`` drives matrix i) with batched QRs; (B, rows, rank)."""
    matrices = list(matrices)
    gens = [None] * len(matrices) if generators is None else list(generators)
    return _rsvd_bases(matrices, rank, gens, oversample, power_iters)


def random_basis(matrix: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A seeded Gaussian basis (GoLore / APOLLO style): only the seed needs storing, and no QR is paid.

    Entries are i.i.d. N(0, 1/rows). Then ``E[P^T P] = I`` (the columns are orthonormal in expectation, so an
    update ``P N`` has the norm of ``N`` on average, as with an orthonormal basis: ``scale`` and the learning
    rate keep their meaning) and ``E[P P^T] = (rank/rows) I``, the same as for a Haar-random orthonormal basis.
    APOLLO (arXiv 2412.05270) uses N(0, 1/rank), i.e. ``sqrt(rows/rank)`` times these entries, which makes
    ``E[P P^T] = I``; in a GaLore update that factor would enlarge the step by ``sqrt(rows/rank)`` (2x at the
    LLaMA-60M and 7B shapes). GaLore regenerates the basis on every step from (seed, last refresh): dropping the
    QR the orthonormal version paid there is what keeps this projector's step as fast as the stored ones'.

    Args:
        matrix: (rows, cols) tensor; only its shape and device are used.
        rank: basis size, 1 <= rank <= rows.
        generator: seeded generator on ``matrix``'s device; the same seed gives the same basis.

    Returns:
        (rows, rank) fp32 tensor.
    """
    rows = matrix.shape[0]
    _check_rank(matrix.shape, rank, rows, "random")
    gaussian = torch.randn(rows, rank, generator=generator, device=matrix.device, dtype=torch.float32)
    return gaussian.mul_(rows**-0.5)


def identity_basis(matrix: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The identity: a full-rank "projection" that leaves the gradient unchanged (reference checks)."""
    del generator
    rows = matrix.shape[0]
    if rank != rows:
        raise ValueError(f"identity projector needs rank == min(m, n) == {rows}, got rank={rank}")
    return torch.eye(rows, device=matrix.device, dtype=torch.float32)


def _svd_workspace(rows: int, cols: int, rank: int) -> int:
    low, high = min(rows, cols), max(rows, cols)
    return low * low + low * high + low


def _rsvd_workspace(rows: int, cols: int, rank: int, *, oversample: int = 8, power_iters: int = 1) -> int:
    del power_iters
    width = rank + oversample
    return 2 * max(rows, cols) * width + 2 * width * width


register_projector(ProjectorKind("svd", svd_basis, workspace=_svd_workspace, build_batched=svd_bases_batched))
register_projector(
    ProjectorKind(
        "rsvd",
        rsvd_basis,
        options=("oversample", "power_iters"),
        workspace=_rsvd_workspace,
        build_batched=rsvd_bases_batched,
    )
)
register_projector(
    ProjectorKind(
        "random",
        random_basis,
        stores_basis=False,
        uses_gradient=False,
        workspace=lambda rows, cols, rank: min(rows, cols) * rank,
    )
)
register_projector(
    ProjectorKind(
        "identity",
        identity_basis,
        stores_basis=False,
        uses_gradient=False,
        full_rank=True,
        workspace=lambda rows, cols, rank: min(rows, cols) ** 2,
    )
)
