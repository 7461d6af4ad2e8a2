"""The held-out guard of WeLore's default (``strategy="auto"``, issue 23).

Every allocation rule wins on some model: ``"whitened-loss"`` beat ``"whitened"`` on SmolLM2 and was 2.8x worse on
another model family. The guard holds out the last fifth of the user's calibration sequences, compresses with each
:func:`~lowrank_train.welore.allocation.guard_candidates` rule on the rest, and keeps the one whose compressed model
has the smallest mean token loss on the held-out sequences. :func:`split_calibration` and :func:`heldout_loss` are
its pieces; ``compress_model`` runs the loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "HELDOUT_FRACTION",
    "MIN_FIT_SEQUENCES",
    "MIN_HELDOUT_SEQUENCES",
    "GuardReport",
    "heldout_loss",
    "split_calibration",
]

HELDOUT_FRACTION = 0.2
MIN_HELDOUT_SEQUENCES = 2
MIN_FIT_SEQUENCES = 2


@dataclass(frozen=True)
class GuardReport:
    """What the guard measured.

    Attributes:
        losses: mean held-out token loss of the compressed model per candidate (empty when it did not run).
        winner: the strategy used.
        margin: runner-up's loss minus the winner's, in nats (``exp(margin)`` is the perplexity ratio); ``None``
            when it did not run.
        seconds: wall time of the whole guarded compression (every candidate and its held-out loss).
        fit_sequences: calibration sequences the statistics were measured on.
        heldout_sequences: sequences held out to score the candidates.
        fallback: why the guard did not run (``None`` when it did).
        refit: the winner was compressed again on every calibration sequence (``WeLoreConfig.guard_refit``).
    """

    losses: dict[str, float] = field(default_factory=dict)
    winner: str = ""
    margin: float | None = None
    seconds: float = 0.0
    fit_sequences: int = 0
    heldout_sequences: int = 0
    fallback: str | None = None
    refit: bool = False

    def summary(self) -> str:
        """One line: which candidate won and by how much, or why the guard did not run."""
        if self.fallback is not None:
            return f"guard skipped ({self.fallback}); used the unguarded default {self.winner!r}"
        scores = ", ".join(f"{name} {loss:.4f}" for name, loss in self.losses.items())
        margin = "" if self.margin is None else f" by {self.margin:.4f} nats (perplexity x{math.exp(self.margin):.3f})"
        refit = f", then refitted on all {self.fit_sequences + self.heldout_sequences}" if self.refit else ""
        return (
            f"guard: {self.winner!r} won{margin} on {self.heldout_sequences} held-out sequences (fit on "
            f"{self.fit_sequences}{refit}; losses {scores}; {self.seconds:.1f} s)"
        )


def split_calibration(sequences: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]] | None:
    """Splits calibration sequences into a fitting part and a held-out part (the last fifth, at least two).

    Args:
        sequences: token-id sequences, in order.

    Returns:
        ``(fit, heldout)``, disjoint by position, together all of ``sequences``; ``None`` when fewer than
        :data:`MIN_FIT_SEQUENCES` would be left to fit on.
    """
    held = max(MIN_HELDOUT_SEQUENCES, round(len(sequences) * HELDOUT_FRACTION))
    if len(sequences) - held < MIN_FIT_SEQUENCES:
        return None
    cut = len(sequences) - held
    return list(sequences[:cut]), list(sequences[cut:])


def _logits(output: object) -> Tensor:
    logits = getattr(output, "logits", output)
    if isinstance(logits, tuple | list):
        logits = logits[0]
    if not isinstance(logits, Tensor):
        raise ValueError(f"the model returned {type(output).__name__}; expected logits")
    return logits


@torch.no_grad()
def heldout_loss(model: nn.Module, sequences: Sequence[Tensor]) -> float:
    """Mean next-token cross-entropy of ``model`` over every predicted token of ``sequences``.

    Args:
        model: a causal LM, called as ``model(input_ids)``, returning logits (or an output with ``.logits``).
        sequences: ``(1, seq_len)`` token ids on the model's device.

    Returns:
        The loss in nats per token.
    """
    total, count = 0.0, 0
    for ids in sequences:
        if ids.shape[-1] < 2:
            continue
        logits = _logits(model(ids))
        total += float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[-1] - 1
    if count == 0:
        raise ValueError("the held-out calibration sequences predict no token (each needs at least 2)")
    return total / count
