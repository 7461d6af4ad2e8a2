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

    def projection_is_shared(self, param):
        self._count("projection_is_shared")
        return self.dense.projection_is_shared(param)

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

    def local(self, tensor):
        self._count("local")
        return self.dense.local(tensor)

    def sum_over_shards(self, value, param, frame):
        self._count(f"sum_over_shards:{frame}")
        return self.dense.sum_over_shards(value, param, frame)


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
    # Refreshes at steps 0 and 2; every step checks, projects and writes back once. Step 1 (between refreshes) asks
    # whether the check may read the projection.
    assert backend.calls == {
        "check_param": 1,
        "finite_flags": 3,
        "projection_is_shared": 1,
        "build_basis": 2,
        "local_basis": 3,
        "project_gradient": 3,
        "write_back": 3,
        "local": 3,  # the gradient handed to the update rule
    }
    torch.testing.assert_close(w, w_ref)  # scale 0.5 halved by the backend == scale 0.25


def test_update_rules_take_their_cross_row_sums_from_the_backend():
    """APOLLO-Mini (tensor-wise) with the limiter: two sums per step, one per frame; a channel-wise ratio none."""
    from lowrank_train.optim import APOLLOAdamW, APOLLOMini

    for cls, expected in ((APOLLOMini, {"projected": 2, "weight": 2}), (APOLLOAdamW, {"weight": 2})):
        w = nn.Parameter(torch.randn(12, 20))
        backend = RecordingBackend()
        opt = cls([{"params": [w], "rank": 3, "update_gap": 5}], lr=1e-2, backend=backend)
        for _ in range(2):
            w.grad = torch.randn(12, 20)
            opt.step()
        sums = {k.split(":")[1]: v for k, v in backend.calls.items() if k.startswith("sum_over_shards")}
        assert sums == expected, cls.__name__


def test_backend_must_implement_the_protocol():
    with pytest.raises(ValueError, match="ProjectionBackend"):
        GaLoreAdamW([nn.Parameter(torch.randn(4, 8))], backend=object())


def test_fsdp2galore_on_ordinary_tensors_is_adamw_on_the_projected_gradient():
    """Ordinary tensors take FSDP2Backend's dense path. Reference: torch AdamW on Z (r x n) with the projected
    gradients, W <- W (1 - lr wd) + s P dZ (decoupled decay on the full weight), torch AdamW on the bias."""
    assert isinstance(FSDP2Backend(), ProjectionBackend)
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(16))
    w_ref, b_ref = w.detach().clone(), nn.Parameter(b.detach().clone())
    grads = [(torch.randn(8, 16), torch.randn(16)) for _ in range(4)]
    rank, scale, lr, wd = 2, 0.5, 1e-2, 0.1
    groups = [{"params": [w], "rank": rank, "update_gap": 100, "scale": scale}, {"params": [b]}]
    opt = FSDP2GaLore(groups, lr=lr, weight_decay=wd)
    assert isinstance(opt.backend, FSDP2Backend)
    basis = torch.linalg.svd(grads[0][0], full_matrices=False)[0][:, :rank]  # left singular vectors (m < n)
    z = nn.Parameter(torch.zeros(rank, 16))
    z_opt, b_opt = torch.optim.AdamW([z], lr=lr, weight_decay=0.0), torch.optim.AdamW([b_ref], lr=lr, weight_decay=wd)
    for gw, gb in grads:
        w.grad, b.grad, z.grad, b_ref.grad = gw.clone(), gb.clone(), basis.T @ gw, gb.clone()
        opt.step()
        z_before = z.detach().clone()
        z_opt.step()
        b_opt.step()
        w_ref = w_ref * (1 - lr * wd) + scale * basis @ (z.detach() - z_before)
        torch.testing.assert_close(w.detach(), w_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, b_ref)
    with pytest.raises(ValueError, match="supplies its own backend"):
        FSDP2GaLore([w], backend=DenseBackend())
