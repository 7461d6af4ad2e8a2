import math

import pytest
import torch

from lowrank_train.projection import (
    ProjectorKind,
    build_bases_batched,
    get_projector,
    orient,
    project_back,
    project_gradient,
    random_basis,
    rsvd_basis,
    subspace_overlap,
    svd_basis,
)

torch.set_num_threads(1)


def matrix_with_spectrum(rows: int, cols: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=g))
    return (u * singular_values) @ v.T


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return signal + noise * signal.std() * torch.randn(rows, cols, generator=g)


def float64_svd_basis(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The oracle: left singular vectors of the same values by a float64 SVD, signed like our bases."""
    u = torch.linalg.svd(matrix.double(), full_matrices=False)[0][:, :rank]
    pivot = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    return u * torch.sign(pivot)


def captured_energy(basis: torch.Tensor, matrix: torch.Tensor) -> float:
    """||P^T A||_F^2 in float64: what a rank-r projection keeps of A."""
    return float((basis.double().T @ matrix.double()).square().sum())


SPECTRUM_CASES = {
    # (rows, cols, matrix builder, rank); the spectra of the projector's accuracy claims.
    "gapped": (
        64,
        300,
        lambda: matrix_with_spectrum(64, 300, torch.cat([torch.linspace(10, 5, 16), torch.full((48,), 0.05)])),
        16,
    ),
    "low-rank+noise": (96, 250, lambda: low_rank_plus_noise(96, 250, 12, 1e-2, seed=3), 12),
    "steep decay 1e6": (80, 200, lambda: matrix_with_spectrum(80, 200, torch.logspace(0, -6, 80), seed=4), 60),
    "no gap (1/i)": (120, 240, lambda: matrix_with_spectrum(120, 240, 1 / torch.arange(1.0, 121.0), seed=5), 30),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(SPECTRUM_CASES), ids=list(SPECTRUM_CASES))
def test_svd_basis_is_as_accurate_as_an_exact_svd(case, dtype):
    rows, cols, build, rank = SPECTRUM_CASES[case]
    a = build().to(dtype)  # bf16: the gradient arrives rounded; the oracle sees the same rounded values
    basis = svd_basis(a, rank)
    oracle = float64_svd_basis(a, rank)
    assert basis.shape == (rows, rank) and basis.dtype == torch.float32
    torch.testing.assert_close(basis.T @ basis, torch.eye(rank), atol=2e-6, rtol=0)
    best = captured_energy(oracle, a)
    # Eckart-Young: no rank-r subspace keeps more; ours keeps the optimum up to fp32 rounding of the basis.
    assert captured_energy(basis, a) == pytest.approx(best, rel=2e-6)
    fp32_svd = torch.linalg.svd(a.float(), full_matrices=False)[0][:, :rank]
    assert float(subspace_overlap(oracle, basis)) >= float(subspace_overlap(oracle, fp32_svd)) - 1e-6
    if case != "no gap (1/i)":  # distinct, separated singular values: the vectors themselves are determined
        torch.testing.assert_close(basis.double(), oracle, atol=5e-5, rtol=0)


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
    # Columns come in decreasing singular value order.
    torch.testing.assert_close((basis.T @ orient(a)).norm(dim=1), s[:rank], rtol=1e-4, atol=0)


def test_svd_basis_of_a_tall_matrix_is_its_left_singular_basis():
    a = matrix_with_spectrum(90, 40, torch.logspace(0, -2, 40), seed=7)  # not oriented: rows > cols
    basis = svd_basis(a, 6)
    torch.testing.assert_close(basis.double(), float64_svd_basis(a, 6), atol=1e-5, rtol=0)


def test_svd_basis_is_deterministic_and_independent_of_the_gradient_layout():
    a = torch.randn(60, 140, generator=torch.Generator().manual_seed(8))
    one = svd_basis(a, 9)
    assert torch.equal(one, svd_basis(a.clone(), 9))
    torch.testing.assert_close(svd_basis(a.T.contiguous().T, 9), one, atol=1e-6, rtol=0)  # a strided view


@pytest.mark.parametrize("name", ["svd", "rsvd", "random"])
@pytest.mark.parametrize("rank", [0, 41, 2.0, True])
def test_builders_reject_a_rank_outside_the_matrix(name, rank):
    with pytest.raises(ValueError, match=rf"rank must be an integer in \[1, 40\] for a 40 x 90 matrix \('{name}'"):
        get_projector(name).build(torch.randn(40, 90), rank, torch.Generator().manual_seed(0))


def test_rsvd_agrees_with_svd_when_the_spectrum_has_a_gap():
    s = torch.cat([torch.linspace(10, 5, 16), torch.full((48,), 0.05)])
    a = matrix_with_spectrum(64, 300, s, seed=1)
    exact = svd_basis(a, 16)
    approx = rsvd_basis(a, 16, torch.Generator().manual_seed(3), oversample=8, power_iters=2)
    torch.testing.assert_close(approx.T @ approx, torch.eye(16), atol=1e-5, rtol=0)
    assert subspace_overlap(exact, approx) > 0.9999
    assert captured_energy(approx, a) == pytest.approx(captured_energy(exact, a), rel=1e-5)


def test_rsvd_is_reproducible_from_its_generator():
    a = torch.randn(30, 80)
    one = rsvd_basis(a, 5, torch.Generator().manual_seed(11))
    two = rsvd_basis(a, 5, torch.Generator().manual_seed(11))
    assert torch.equal(one, two)
    assert not torch.equal(one, rsvd_basis(a, 5, torch.Generator().manual_seed(12)))


def haar_basis(matrix: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The previous "random" projector: QR of a Gaussian, sign-fixed (Haar-distributed orthonormal columns)."""
    q, r = torch.linalg.qr(torch.randn(matrix.shape[0], rank, generator=generator))
    return q * torch.sign(torch.diagonal(r))


BATCH_CASES = [
    ("svd", {}),
    ("rsvd", {"oversample": 4, "power_iters": 2}),
    ("random", {}),
    ("identity", {}),
    (ProjectorKind("haar", haar_basis, stores_basis=False, uses_gradient=False), {}),  # no build_batched: a loop
]


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize(
    "kind, options", BATCH_CASES, ids=[c[0] if isinstance(c[0], str) else "haar" for c in BATCH_CASES]
)
def test_batched_build_equals_one_build_per_matrix(kind, options, as_tensor):
    g = torch.Generator().manual_seed(4)
    mats = [torch.randn(24, 70, generator=g).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float32)]
    mats = [m.float() for m in mats] if as_tensor else mats
    rank = 24 if kind == "identity" else 6
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    batched = build_bases_batched(kind, torch.stack(mats) if as_tensor else mats, rank, gens, **options)
    single = get_projector(kind) if isinstance(kind, str) else kind
    for i, m in enumerate(mats):
        want = single.build(m, rank, torch.Generator().manual_seed(100 + i), **options)
        torch.testing.assert_close(batched[i], want, atol=1e-6, rtol=0)
    assert batched.shape == (3, 24, rank) and batched.dtype == torch.float32


def test_batched_build_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="at least one matrix"):
        build_bases_batched("svd", [], 4)
    with pytest.raises(ValueError, match=r"matrices\[1\] has shape \(20, 30\), matrices\[0\] \(20, 31\)"):
        build_bases_batched("svd", [torch.randn(20, 31), torch.randn(20, 30)], 4)
    with pytest.raises(ValueError, match="got 1 generators for 2 matrices"):
        build_bases_batched("rsvd", [torch.randn(20, 30)] * 2, 4, [torch.Generator()])
    with pytest.raises(ValueError, match="unknown projector 'qr'"):
        build_bases_batched("qr", [torch.randn(20, 30)], 4)


def test_random_projector_is_a_seeded_gaussian_of_the_right_shape():
    kind = get_projector("random")
    a = torch.randn(48, 100)
    one = kind.build(a, 6, torch.Generator().manual_seed(5))
    two = kind.build(torch.zeros(48, 100), 6, torch.Generator().manual_seed(5))
    other = kind.build(a, 6, torch.Generator().manual_seed(6))
    assert one.shape == (48, 6) and one.dtype == torch.float32
    assert torch.equal(one, two)  # depends on the seed, not on the gradient's values
    assert not torch.allclose(one, other)
    # A stride-0 view (what GaLore passes between refreshes) gives the same basis: only shape and device count.
    assert torch.equal(kind.build(torch.zeros(()).expand(48, 100), 6, torch.Generator().manual_seed(5)), one)
    assert not kind.stores_basis and not kind.uses_gradient


def test_random_projector_is_orthonormal_in_expectation():
    rows, rank, samples = 16, 4, 4000
    bases = torch.stack(
        [random_basis(torch.empty(rows, 30), rank, torch.Generator().manual_seed(s)) for s in range(samples)]
    )
    # Entries N(0, 1/rows): E[P^T P] = I_rank (updates keep their norm on average, as with an orthonormal basis)
    # and E[P P^T] = (rank/rows) I_rows (as for a Haar basis). Tolerances: 5 standard errors of the mean.
    gram_r = (bases.mT @ bases).mean(0)
    gram_d = (bases @ bases.mT).mean(0)
    torch.testing.assert_close(gram_r, torch.eye(rank), atol=5 * math.sqrt(2 / rows / samples), rtol=0)
    torch.testing.assert_close(
        gram_d, rank / rows * torch.eye(rows), atol=5 * math.sqrt(2 * rank / rows**2 / samples), rtol=0
    )
    # The same first two moments as the orthonormal Haar basis it replaces.
    haar = torch.stack(
        [haar_basis(torch.empty(rows, 30), rank, torch.Generator().manual_seed(s)) for s in range(samples)]
    )
    torch.testing.assert_close(gram_d, (haar @ haar.mT).mean(0), atol=0.03, rtol=0)


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
