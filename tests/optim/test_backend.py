"""The ProjectionBackend seam: GaLore delegates every layout-dependent operation to it (issue 11 item 4)."""

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from lowrank_train.integrations.fsdp import FSDP2Backend, FSDP2GaLore
from lowrank_train.optim import GaLore, GaLoreAdamW
from lowrank_train.optim.backend import DenseBackend, ProjectionBackend


@dataclass
class RecordingBackend:
    """DenseBackend's math, counting calls; its write-back halves the update to prove GaLore uses it."""

    calls: dict[str, int] = field(default_factory=dict)
    dense: DenseBackend = DenseBackend()

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def check_param(self, param, label):
        self._count("check_param")
        self.dense.check_param(param, label)

    def finite_flags(self, grads):
        self._count("finite_flags")
        return self.dense.finite_flags(grads)

    def build_basis(self, param, build):
        self._count("build_basis")
        return self.dense.build_basis(param, build)

    def local_basis(self, basis, param):
        self._count("local_basis")
        return basis

    def project_gradient(self, grad, basis):
        self._count("project_gradient")
        return self.dense.project_gradient(grad, basis)

    def projected_shape(self, param, rank):
        self._count("projected_shape")
        return self.dense.projected_shape(param, rank)

    def write_back(self, param, update, *, lr, weight_decay, scale, generator):
        self._count("write_back")
        self.dense.write_back(param, update, lr=lr, weight_decay=weight_decay, scale=scale / 2, generator=generator)


def test_galore_runs_every_layout_operation_through_its_backend():
    torch.manual_seed(0)
    w_ref = nn.Parameter(torch.randn(12, 20))
    w = nn.Parameter(w_ref.detach().clone())
    backend = RecordingBackend()
    assert isinstance(backend, ProjectionBackend)
    opt = GaLore([{"params": [w], "rank": 3, "update_gap": 2, "scale": 0.5}], lr=1e-2, backend=backend)
    ref = GaLore([{"params": [w_ref], "rank": 3, "update_gap": 2, "scale": 0.25}], lr=1e-2)
    for _ in range(3):
        grad = torch.randn(12, 20)
        w.grad, w_ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    # Refreshes at steps 0 and 2; every step checks, projects and writes back once.
    assert backend.calls == {
        "check_param": 1,
        "finite_flags": 3,
        "build_basis": 2,
        "local_basis": 3,
        "project_gradient": 3,
        "write_back": 3,
    }
    torch.testing.assert_close(w, w_ref)  # scale 0.5 halved by the backend == scale 0.25


def test_backend_must_implement_the_protocol():
    with pytest.raises(ValueError, match="ProjectionBackend"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 8))], backend=object())


def test_fsdp2galore_only_supplies_a_backend():
    """Composition, not implementation inheritance: no GaLore method is overridden."""
    assert [name for name in vars(FSDP2GaLore) if callable(vars(FSDP2GaLore)[name])] == ["__init__"]
    assert isinstance(FSDP2Backend(), ProjectionBackend)
    w = nn.Parameter(torch.randn(8, 16))
    opt = FSDP2GaLore([{"params": [w], "rank": 2}], lr=1e-3)  # ordinary tensors take the dense path
    assert isinstance(opt.backend, FSDP2Backend)
    w.grad = torch.randn(8, 16)
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w, before)
    with pytest.raises(ValueError, match="supplies its own backend"):
        FSDP2GaLore([w], backend=DenseBackend())
