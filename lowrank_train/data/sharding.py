"""Data-parallel sharding of a batch stream: every rank draws the same global batch and keeps its own rows.

With ``world_size`` ranks and a per-rank micro-batch ``b``, the stream is opened with ``world_size * b`` rows per
batch on every rank (same seed, same order) and rank ``r`` keeps rows ``[r * b, (r + 1) * b)``. The ranks together
then see exactly the batches one process sees with micro-batch ``world_size * b``, and the stream's state (the
global position) is the same on every rank, so rank 0's copy in a checkpoint resumes all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class RankShare(Iterator[torch.Tensor]):
    """Rank ``rank``'s rows of every batch of ``batches`` (a resumable stream of global batches).

    Args:
        batches: the global batch stream; ``state_dict`` / ``load_state_dict`` are passed through.
        rank: this process's rank.
        world_size: the number of ranks; the global batch size must be a multiple of it.
    """

    def __init__(self, batches: Iterator[torch.Tensor], *, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> RankShare:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.batches)
        if batch.shape[0] % self.world_size:
            raise ValueError(f"a global batch of {batch.shape[0]} rows cannot be split over {self.world_size} ranks")
        rows = batch.shape[0] // self.world_size
        return batch[self.rank * rows : (self.rank + 1) * rows]

    def state_dict(self) -> dict[str, Any]:
        """The global stream's state (identical on every rank)."""
        return self.batches.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues the global stream from a :meth:`state_dict`."""
        self.batches.load_state_dict(state)  # type: ignore[attr-defined]
