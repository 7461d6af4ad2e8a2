"""accelerate: Accelerator.prepare(model, optimizer) with our optimizers, bf16 autocast and accumulation."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from lowrank_train.optim import GaLoreAdamW, lowrank_param_groups

STEPS, ACCUM = 4, 2


@pytest.fixture
def fresh_accelerate_state():
    # Accelerator keeps process-wide singletons; Trainer tests create their own.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    start = torch.randint(0, 256, (STEPS * ACCUM, 4, 1), generator=generator)
    return list((start + 3 * torch.arange(12)) % 256)


def make_optimizer(model: torch.nn.Module) -> GaLoreAdamW:
    return GaLoreAdamW(lowrank_param_groups(model, rank=8, update_gap=2, scale=1.0), lr=1e-2, weight_decay=0.1)


def test_prepare_with_bf16_autocast_and_accumulation_matches_a_manual_loop(tiny_llama, fresh_accelerate_state):
    """accelerate (bf16 autocast, 2-step accumulation) == the same loop written by hand with torch.autocast."""
    initial = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    optimizer = make_optimizer(tiny_llama)
    losses = []
    for i, ids in enumerate(batches()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = tiny_llama(input_ids=ids, labels=ids).loss
        (loss / ACCUM).backward()
        losses.append(loss.item())
        if (i + 1) % ACCUM == 0:
            optimizer.step()
            optimizer.zero_grad()
    reference = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}

    with torch.no_grad():
        for name, p in tiny_llama.named_parameters():
            p.copy_(initial[name])
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=ACCUM)
    model, optimizer = accelerator.prepare(tiny_llama, make_optimizer(tiny_llama))
    for ids in batches():
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()  # skipped by accelerate on the first micro-batch of each step
            optimizer.zero_grad()
    for name, p in accelerator.unwrap_model(model).named_parameters():
        assert not torch.equal(p, initial[name]), f"{name} did not move"
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sum(losses[-2:]) < sum(losses[:2])
    # The wrapped optimizer's checkpoint is ours: tensor-only, weights_only-loadable.
    state = optimizer.state_dict()
    assert any("basis" in s for s in state["state"].values())
