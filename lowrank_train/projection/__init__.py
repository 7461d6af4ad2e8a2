"""How a gradient is projected onto a low-rank subspace, and how that subspace is built."""

from lowrank_train.projection.adaptive import next_refresh_gap, push_similarity, validate_adaptive_options
from lowrank_train.projection.ops import (
    basis_rows,
    orient,
    project_back,
    project_gradient,
    projects_rows,
    subspace_overlap,
)
from lowrank_train.projection.projectors import (
    PROJECTORS,
    ProjectorKind,
    build_bases_batched,
    get_projector,
    identity_basis,
    projector_names,
    random_basis,
    register_projector,
    rsvd_bases_batched,
    rsvd_basis,
    svd_bases_batched,
    svd_basis,
)

__all__ = [
    "PROJECTORS",
    "ProjectorKind",
    "basis_rows",
    "build_bases_batched",
    "get_projector",
    "identity_basis",
    "next_refresh_gap",
    "orient",
    "project_back",
    "projector_names",
    "project_gradient",
    "push_similarity",
    "projects_rows",
    "random_basis",
    "register_projector",
    "rsvd_bases_batched",
    "rsvd_basis",
    "subspace_overlap",
    "svd_bases_batched",
    "svd_basis",
    "validate_adaptive_options",
]
