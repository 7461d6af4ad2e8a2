"""Worker of the 2-process LayerwiseOptimizer test: ``torchrun --nproc_per_node 2 layerwise_ddp_worker.py OUT``.

Every rank trains the same small model on its half of each global micro-batch with a layer-wise optimizer and
no DDP wrapper, then saves its final parameters and gradient norms to ``OUT/rank{R}.pt``. The test compares the
ranks with each other and with an ordinary single-process loop over the whole global batch (the helpers below
are shared with it).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, SEQ = 64, 32, 8
GLOBAL_BATCH, STEPS = 4, 4

# name -> (inner optimizer kind, accumulation steps, max_grad_norm, clip mode)
CASES: dict[str, tuple[str, int, float | None, str]] = {
    "galore_acc1_global_clip": ("galore", 1, 0.5, "global-previous"),
    "galore_acc2": ("galore", 2, None, "global-previous"),
    "adamw_acc2_per_param_clip": ("adamw", 2, 0.05, "per-param"),
}


class TinyLM(nn.Module):
    """Embedding -> two linear layers -> head: small enough to start fast, with 2-D weights to project."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, 48)
        self.down = nn.Linear(48, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        hidden = hidden + self.down(F.gelu(self.up(hidden)))
        return self.head(hidden)


def build_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def param_groups(model: nn.Module, kind: str) -> list[dict[str, Any]]:
    if kind == "adamw":
        return [{"params": list(model.parameters())}]
    lowrank = [model.up.weight, model.down.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in lowrank)]
    # update_gap 2: bases are refreshed during the run, exercising the averaged-refresh path.
    return [{"params": lowrank, "rank": 4, "update_gap": 2, "scale": 1.0}, {"params": rest}]


def make_optimizer(kind: str):
    from lowrank_train import GaLoreAdamW

    if kind == "adamw":
        return lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01)
    return lambda groups: GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01)


def micro_batches(accumulation: int) -> list[list[torch.Tensor]]:
    """``STEPS`` steps of ``accumulation`` global micro-batches, each (GLOBAL_BATCH, SEQ + 1) tokens."""
    generator = torch.Generator().manual_seed(1)
    return [
        [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator) for _ in range(accumulation)]
        for _ in range(STEPS)
    ]


def loss_fn(model: nn.Module, tokens: torch.Tensor, accumulation: int) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)) / accumulation


def main(out_dir: str) -> None:
    import torch.distributed as dist

    from lowrank_train.optim.layerwise import LayerwiseOptimizer
    from lowrank_train.train.parallel import end_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = GLOBAL_BATCH // world
    calls = [0]
    all_reduce = dist.all_reduce

    def counted_all_reduce(*args, **kwargs):
        calls[0] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted_all_reduce  # the test checks how often the engine communicates
    results: dict[str, Any] = {}
    for name, (kind, accumulation, max_norm, clip_mode) in CASES.items():
        model = build_model()
        opt = LayerwiseOptimizer(
            param_groups(model, kind),
            make_optimizer(kind),
            accumulation_steps=accumulation,
            max_grad_norm=max_norm,
            clip_mode=clip_mode,
        )
        norms = []
        calls[0] = 0
        for step in micro_batches(accumulation):
            for tokens in step:
                loss_fn(model, tokens[rank * shard : (rank + 1) * shard], accumulation).backward()
            norms.append(opt.last_grad_norm.clone())
        results[name] = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "norms": torch.stack(norms),
            "all_reduce_calls": torch.tensor(calls[0]),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    end_process_group()  # frees the FSDP / hook cycles that hold the group first


if __name__ == "__main__":
    main(sys.argv[1])
