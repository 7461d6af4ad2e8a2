"""WeLore's one factorization, truncated_factors: Eckart-Young truncation, weighted truncation, argument checks."""

import pytest
import torch
from torch import nn

from lowrank_train.nn.lowrank_linear import LowRankLinear
from lowrank_train.welore.spectrum import truncated_factors, weighted_matrix

torch.set_num_threads(1)


def _inputs(in_features: int, generator: torch.Generator) -> torch.Tensor:
    # Anisotropic inputs (a few loud channels), like real LLM activations.
    scale = torch.logspace(0, 1.5, in_features)[torch.randperm(in_features, generator=generator)]
    return torch.randn(256, in_features, generator=generator) * scale


def _weighting(kind: str, x: torch.Tensor) -> dict:
    if kind == "plain":
        return {}
    if kind == "scale":
        return {"input_scale": x.abs().mean(0).sqrt()}
    moment = x.T.double() @ x.double() / x.shape[0]
    return {"whitening": torch.linalg.cholesky(moment).float()}


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_truncation_matches_eckart_young(shape):
    torch.manual_seed(2)
    weight = torch.randn(*shape, dtype=torch.float64)
    singular_values = torch.linalg.svdvals(weight)
    for rank in (1, 7, 19):
        factor_out, factor_in = truncated_factors(weight, rank)
        error = torch.linalg.matrix_norm(weight - factor_out @ factor_in)
        assert error == pytest.approx(float(singular_values[rank:].square().sum().sqrt()), rel=1e-6)


@pytest.mark.parametrize("kind", ["scale", "whiten"])
@torch.no_grad()
def test_weighted_truncation_has_lower_output_error(kind):
    generator = torch.Generator().manual_seed(3)
    linear = nn.Linear(32, 24, bias=False)
    x = _inputs(32, generator)
    plain = LowRankLinear.from_factors(linear, *truncated_factors(linear.weight, 6))
    weighted = LowRankLinear.from_factors(linear, *truncated_factors(linear.weight, 6, **_weighting(kind, x)))
    reference = linear(x)
    plain_error = (plain(x) - reference).norm()
    weighted_error = (weighted(x) - reference).norm()
    assert weighted_error < plain_error
    if kind == "whiten":  # SVD-LLM's truncation is optimal on these inputs: compare with the closed form.
        singular_values = torch.linalg.svdvals(weighted_matrix(linear.weight, **_weighting(kind, x)))
        optimum = float(singular_values[6:].square().sum().sqrt()) * x.shape[0] ** 0.5
        assert float(weighted_error) == pytest.approx(optimum, rel=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be"),
        ({"rank": 13}, "rank must be"),
        ({"rank": 2, "input_scale": torch.ones(3)}, "input_scale must have shape"),
        ({"rank": 2, "input_scale": -torch.ones(20)}, "strictly positive"),
        ({"rank": 2, "whitening": torch.eye(5)}, "whitening must be"),
        ({"rank": 2, "whitening": torch.eye(20), "input_scale": torch.ones(20)}, "at most one"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        truncated_factors(nn.Linear(20, 12).weight, **kwargs)
