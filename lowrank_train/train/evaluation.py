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
) -> float:
    """Mean next-token cross-entropy over held-out blocks.

    Args:
        model: a causal LM returning ``.loss`` when given ``labels``.
        blocks: ``(M, seq_len)`` token ids.
        batch_size: blocks per forward pass.
        max_batches: stop after this many batches (0: all).
        device: where the model lives.
        on_batch: called after each batch (progress; :func:`num_batches` batches in all).

    Returns:
        The loss averaged over every predicted token (each block predicts ``seq_len - 1`` tokens).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, start in enumerate(range(0, blocks.shape[0], batch_size)):
        if max_batches and index >= max_batches:
            break
        batch = blocks[start : start + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * tokens
        count += tokens
        if on_batch is not None:
            on_batch()
    model.train(was_training)
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
