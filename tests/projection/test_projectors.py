import pytest
import torch

from lowrank_train.projection import (
    get_projector,
    orient,
    project_back,
    project_gradient,
    rsvd_basis,
    subspace_overlap,
    svd_basis,
)


def matrix_with_spectrum(rows: int, cols: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=g))
    return (u * singular_values) @ v.T


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (50, 50)])
def test_svd_basis_is_the_best_rank_r_subspace(shape):
    rows, cols = shape
    k = min(shape)
    s = torch.logspace(1, -2, k)
    a = matrix_with_spectrum(rows, cols, s)
    rank = 7
    basis = svd_basis(orient(a), rank)
    assert basis.shape == (k, rank)
    torch.testing.assert_close(basis.T @ basis, torch.eye(rank), atol=1e-5, rtol=0)
    # Eckart-Young oracle: the residual of projecting on the top-r subspace is the tail of the spectrum.
    residual = orient(a) - basis @ (basis.T @ orient(a))
    torch.testing.assert_close(residual.norm(), s[rank:].norm(), rtol=1e-4, atol=1e-5)


def test_rsvd_agrees_with_svd_when_the_spectrum_has_a_gap():
    s = torch.cat([torch.linspace(10, 5, 16), torch.full((48,), 0.05)])
    a = matrix_with_spectrum(64, 300, s, seed=1)
    exact = svd_basis(a, 16)
    approx = rsvd_basis(a, 16, torch.Generator().manual_seed(3), oversample=8, power_iters=2)
    torch.testing.assert_close(approx.T @ approx, torch.eye(16), atol=1e-5, rtol=0)
    assert subspace_overlap(exact, approx) > 0.9999


def test_rsvd_is_reproducible_from_its_generator():
    a = torch.randn(30, 80)
    one = rsvd_basis(a, 5, torch.Generator().manual_seed(11))
    two = rsvd_basis(a, 5, torch.Generator().manual_seed(11))
    assert torch.equal(one, two)


def test_random_projector_is_reproducible_orthonormal_and_seed_dependent():
    kind = get_projector("random")
    a = torch.randn(48, 100)
    one = kind.build(a, 6, torch.Generator().manual_seed(5))
    two = kind.build(torch.zeros(48, 100), 6, torch.Generator().manual_seed(5))
    other = kind.build(a, 6, torch.Generator().manual_seed(6))
    assert torch.equal(one, two)  # depends on the seed, not on the gradient's values
    assert not torch.allclose(one, other)
    torch.testing.assert_close(one.T @ one, torch.eye(6), atol=1e-5, rtol=0)
    assert not kind.stores_basis


def test_unknown_projector_names_the_choices():
    with pytest.raises(ValueError, match="unknown projector 'qr'.*rsvd"):
        get_projector("qr")


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)])
def test_projection_picks_the_smaller_side_and_round_trips(shape):
    g = torch.randn(*shape)
    basis = torch.linalg.qr(torch.randn(min(shape), min(shape)))[0]  # full orthonormal basis
    low = project_gradient(g, basis)
    assert low.shape == (min(shape), max(shape))
    torch.testing.assert_close(project_back(low, basis, g.shape), g, atol=1e-5, rtol=0)
    if shape[0] <= shape[1]:
        torch.testing.assert_close(low, basis.T @ g)
    else:
        torch.testing.assert_close(low.T, g @ basis)


def test_subspace_overlap_is_rotation_and_sign_invariant():
    p = torch.linalg.qr(torch.randn(30, 4))[0]
    rotation = torch.linalg.qr(torch.randn(4, 4))[0]
    assert subspace_overlap(p, -p @ rotation) == pytest.approx(1.0, abs=1e-5)
    q = torch.linalg.qr(torch.randn(30, 4))[0]
    q = torch.linalg.qr(q - p @ (p.T @ q))[0]  # orthogonal complement
    assert subspace_overlap(p, q) == pytest.approx(0.0, abs=1e-5)
