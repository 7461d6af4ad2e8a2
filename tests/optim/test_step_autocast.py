"""An optimizer step called inside an autocast region (issue 13 audit): hand-written loops often do
``with torch.autocast(...): loss = ...; loss.backward(); opt.step()``. Before the fix GaLore's projections ran
as bf16 matmuls there and the weights silently drifted (up to 2e-3 after 4 steps); now the step is exactly the
step taken outside autocast."""

import copy

import pytest
import torch
from torch import nn

from lowrank_train import GaLoreAdamW, lowrank_param_groups
from lowrank_train.nn import quantize_model
from lowrank_train.optim import QGaLoreAdamW8bit
from lowrank_train.optim.layerwise import LayerwiseOptimizer

CASES = [
    pytest.param(GaLoreAdamW, {"projector": "svd"}, False, id="galore-svd"),
    pytest.param(GaLoreAdamW, {"projector": "rsvd"}, False, id="galore-rsvd"),
    pytest.param(GaLoreAdamW, {"projector": "random"}, False, id="galore-random"),
    pytest.param(QGaLoreAdamW8bit, {"proj_group_size": 64}, True, id="qgalore-int8"),
]


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96, bias=False)
        self.down = nn.Linear(96, 64, bias=False)


def run(model: nn.Module, cls, options: dict, autocast: bool, device: torch.device) -> list[torch.Tensor]:
    groups = [{"params": list(model.parameters()), "rank": 8, "update_gap": 2, **options}]
    optimizer = cls(groups, lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(5):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if step == 2:  # a micro-batch folded into the projected accumulator, then the step
                for p in model.parameters():
                    optimizer.accumulate_grad(p)
                    p.grad = torch.randn(p.shape, generator=generator).to(device)
            optimizer.step()
    return [
        m.dequantized_weight(torch.float32) if hasattr(m, "dequantized_weight") else m.weight.detach().clone()
        for m in (model.up, model.down)
    ]


@pytest.mark.parametrize("cls, options, quantized", CASES)
def test_step_inside_autocast_equals_the_step_outside(cls, options, quantized, device):
    torch.manual_seed(0)
    model = TwoLinears()
    if quantized:
        quantize_model(model, group_size=64, target_modules="all-linear")
    model.to(device)
    outside = run(copy.deepcopy(model), cls, options, autocast=False, device=device)
    inside = run(copy.deepcopy(model), cls, options, autocast=True, device=device)
    start = run(copy.deepcopy(model), cls, options, autocast=False, device=device)
    for a, b, c in zip(inside, outside, start, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(b, c)  # deterministic: the comparison above is meaningful


def test_layerwise_backward_inside_autocast_equals_the_ordinary_loop(tiny_llama, device):
    """The layer-wise engine steps inside backward; with backward called in the autocast region its GaLore steps
    still match an ordinary loop whose forward alone is under autocast."""
    ref_model = tiny_llama.to(device)
    model = copy.deepcopy(ref_model)
    reference = GaLoreAdamW(lowrank_param_groups(ref_model, rank=8, update_gap=2), lr=3e-3, weight_decay=0.01)
    engine = LayerwiseOptimizer(
        lowrank_param_groups(model, rank=8, update_gap=2), lambda g: GaLoreAdamW(g, lr=3e-3, weight_decay=0.01)
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 256, (2, 12), generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            ref_model(input_ids=ids, labels=ids).loss.backward()
            model(input_ids=ids, labels=ids).loss.backward()  # steps every parameter inside this backward
        reference.step()
        reference.zero_grad()
    assert engine.steps == 3
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
