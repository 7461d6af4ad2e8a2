"""Held-out evaluation: mean next-token cross-entropy and perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    on_batch: Callable[[], None] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Mean next-token cross-entropy over held-out blocks.

    Args:
        model: a causal LM returning ``.loss`` when given ``labels``.
        blocks: ``(M, seq_len)`` token ids.
        batch_size: blocks per forward pass (under several processes: per global batch).
        max_batches: stop after this many batches (0: all).
        device: where the model lives.
        on_batch: called after each batch (progress; :func:`num_batches` batches in all).
        rank: this process's rank; with ``world_size > 1`` it runs its share of the rows of every batch.
        world_size: the number of processes sharing the evaluation.
        all_sum: sums a tensor over the processes (required with ``world_size > 1``).

    Returns:
        The loss averaged over every predicted token (each block predicts ``seq_len - 1`` tokens).
    """
    if world_size > 1 and all_sum is None:
        raise ValueError("evaluate: world_size > 1 needs all_sum to add the processes' partial sums")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, start in enumerate(range(0, blocks.shape[0], batch_size)):
        if max_batches and index >= max_batches:
            break
        batch = blocks[start : start + batch_size]
        share = -(-batch.shape[0] // world_size)
        mine = batch[rank * share : (rank + 1) * share]
        # Every process runs the same forwards (FSDP2 gathers weights in them): an empty share runs a row, unweighted.
        weight = 1 if mine.shape[0] else 0
        mine = (mine if weight else batch[:1]).to(device)
        loss = model(input_ids=mine, labels=mine).loss
        tokens = weight * mine.shape[0] * (mine.shape[1] - 1)
        total += float(loss) * tokens
        count += tokens
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    if all_sum is not None and world_size > 1:
        summed = all_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
        total, count = float(summed[0]), int(summed[1])
    if count == 0:
        raise ValueError("the held-out split is empty: raise data.heldout_fraction")
    return total / count


def num_batches(blocks: torch.Tensor, batch_size: int, max_batches: int) -> int:
    """How many batches :func:`evaluate` runs over ``blocks``."""
    batches = -(-blocks.shape[0] // batch_size)
    return min(batches, max_batches) if max_batches else batches


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite past overflow."""
    return math.exp(loss) if loss < 700 else math.inf
