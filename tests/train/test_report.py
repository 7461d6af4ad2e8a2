"""The memory table measures real optimizer state; its AdamW column matches a real torch AdamW."""

import torch

from lowrank_train.optim import GaLoreAdamW, lowrank_param_groups
from lowrank_train.train.report import adamw_reference_bytes, memory_table, optimizer_state_bytes, weight_bytes


def _step(model, optimizer):
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_adamw_column_equals_real_adamw(tiny_llama):
    optimizer = torch.optim.AdamW(tiny_llama.parameters(), lr=1e-3)
    _step(tiny_llama, optimizer)
    reference = adamw_reference_bytes(tiny_llama, torch.float32)
    assert optimizer_state_bytes(optimizer) == {"states": reference["states"], "bases": 0}
    expected_weights = sum(p.numel() * 4 for p in tiny_llama.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny_llama.buffers()
    )
    assert reference["weights"] == weight_bytes(tiny_llama) == expected_weights


def test_galore_states_and_bases_are_counted(tiny_llama):
    groups = lowrank_param_groups(tiny_llama, rank=8, update_gap=10)
    optimizer = GaLoreAdamW(groups, lr=1e-3)
    _step(tiny_llama, optimizer)
    measured = optimizer_state_bytes(optimizer)
    lowrank = groups[0]["params"]
    # fp32 SVD basis of shape (min(m, n), r) per projected weight
    assert measured["bases"] == sum(min(p.shape) * 8 * 4 for p in lowrank)
    table = memory_table(tiny_llama, optimizer, "galore", torch.float32)
    assert table.ours["states"] < table.adamw["states"]
    assert "| optimizer states |" in table.render()
