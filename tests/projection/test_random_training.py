"""GaLore with the seeded Gaussian "random" projector still trains, at the learning rates of an orthonormal basis."""

import pytest
import torch
from torch import nn

from lowrank_train import GaLoreAdamW
from lowrank_train.projection import PROJECTORS, ProjectorKind

torch.set_num_threads(1)


def haar_basis(matrix: torch.Tensor, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reference: the orthonormal random basis the projector used to build with a QR on every step."""
    q, r = torch.linalg.qr(torch.randn(matrix.shape[0], rank, generator=generator, device=matrix.device))
    return q * torch.sign(torch.diagonal(r))


def regression_losses(projector: str, lr: float, steps: int = 150) -> list[float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    y = x @ (torch.randn(24, 64, generator=g) / 8).T
    w = nn.Parameter(torch.zeros(24, 64))  # the untrained baseline predicts 0
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_gap": 10, "scale": 0.25, "projector": projector}], lr=lr)
    losses = []
    for _ in range(steps):
        loss = (x @ w.T - y).square().mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float((x @ w.T - y).square().mean()))
    return losses


@pytest.mark.parametrize("lr", [0.01, 0.05, 0.2])
def test_galore_with_the_random_projector_trains_like_an_orthonormal_random_basis(lr, monkeypatch):
    monkeypatch.setitem(PROJECTORS, "haar", ProjectorKind("haar", haar_basis, stores_basis=False, uses_gradient=False))
    gaussian = regression_losses("random", lr)
    haar = regression_losses("haar", lr)
    assert gaussian[0] == haar[0]  # same untrained baseline
    assert gaussian[-1] < 0.7 * gaussian[0]
    # Same scale and learning rate semantics as the Haar basis: the final losses agree within 25%.
    assert gaussian[-1] == pytest.approx(haar[-1], rel=0.25)
