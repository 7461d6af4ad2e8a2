"""Calibration text the model writes itself: a general set mixed into a narrow user calibration set (issue 16).

A user's calibration set is whatever text they have (a manual, a code base, a book); statistics measured on it
alone decide which input directions survive, and the compressed model then loses what that text never used.
The model's own samples are the one general corpus that every model can reach offline, with its own tokenizer
and vocabulary: sampled at temperature 1 from the start token they follow the model's training distribution.
On SmolLM2-135M calibrated on 32 x 128 KJV tokens, a third of generated tokens take the 20% model's perplexity on
Python documentation from 41.0 to 28.6 (3.1x -> 2.2x the dense model's) for 59.1 -> 62.6 on KJV itself;
calibrated on Python documentation, KJV goes from 132.5 to 114.0 (``benchmarks/results/welore_ood*.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lowrank_train.welore.spectrum import limit_threads

__all__ = ["generate_calibration", "mix_generated_calibration"]


def _start_token(model: nn.Module) -> int | None:
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        token = getattr(holder, "bos_token_id", None)
        if isinstance(token, int):
            return token
    return None


def _logits(output: object) -> Tensor:
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list):
        return output[0]
    return output  # a plain tensor of logits


@torch.no_grad()
def generate_calibration(
    model: nn.Module,
    num_sequences: int,
    seq_len: int,
    start_tokens: Tensor,
    seed: int = 0,
    num_threads: int | None = 1,
    on_token: Callable[[], None] | None = None,
) -> list[Tensor]:
    """Sample ``num_sequences`` sequences of ``seq_len`` tokens from the model at temperature 1 (no top-k/top-p).

    Hugging Face models use ``model.generate`` (KV cache); any other causal LM is sampled by a plain loop that
    re-runs the prefix each step. Sampling draws from a generator seeded with ``seed`` and leaves the global RNG
    as it was.

    Args:
        model: a causal LM returning logits, called as ``model(input_ids)``.
        num_sequences: how many sequences, ``>= 1``.
        seq_len: tokens per sequence including the start token, ``>= 2``.
        start_tokens: ``(num_sequences,)`` first token of each sequence (the model's BOS, typically).
        seed: sampling seed.
        num_threads: torch thread count while sampling.
        on_token: called after each sampling step (one new token in every sequence), for progress.

    Returns:
        ``num_sequences`` tensors of shape ``(1, seq_len)`` (long, on the model's device).
    """
    if num_sequences < 1 or seq_len < 2:
        raise ValueError(f"need num_sequences >= 1 and seq_len >= 2, got {num_sequences} and {seq_len}")
    device = next(model.parameters()).device
    prompt = start_tokens.reshape(-1, 1).long().to(device)
    if prompt.shape[0] != num_sequences:
        raise ValueError(f"start_tokens has {prompt.shape[0]} entries for {num_sequences} sequences")
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with limit_threads(num_threads), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            defaults = getattr(model, "generation_config", None)
            if callable(getattr(model, "generate", None)) and defaults is not None:
                from transformers import GenerationConfig

                # A fresh config: the checkpoint's own sampling defaults (low temperature, top-p, repetition
                # penalty) would narrow the samples; every token is drawn from the full distribution. No EOS
                # stops a sequence (nor is it suppressed): after one the model starts a new document, as in
                # packed pretraining data.
                sampling = GenerationConfig(
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=seq_len - 1,
                    bos_token_id=defaults.bos_token_id,
                    eos_token_id=None,
                    pad_token_id=int(prompt[0, 0]),
                )
                streamer = _StepCounter(on_token) if on_token is not None else None
                ids = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), generation_config=sampling, streamer=streamer
                )
            else:
                ids = prompt
                for _ in range(seq_len - 1):
                    logits = _logits(model(ids))[:, -1].float()
                    ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, dim=-1), 1)], dim=1)
                    if on_token is not None:
                        on_token()
    finally:
        model.train(was_training)
    return [row[None] for row in ids[:, :seq_len]]


class _StepCounter:
    # A Hugging Face streamer (put/end) that calls back once per sampling step; its first put is the prompt.
    def __init__(self, on_token: Callable[[], None]) -> None:
        self._on_token, self._prompt_seen = on_token, False

    def put(self, _value: Tensor) -> None:
        if self._prompt_seen:
            self._on_token()
        self._prompt_seen = True

    def end(self) -> None:
        pass


def generated_count(sequences: Sequence[Tensor], fraction: float) -> tuple[int, int]:
    """How many sequences :func:`mix_generated_calibration` generates, and their length (``(0, 0)`` for none)."""
    if fraction == 0.0 or not sequences:
        return 0, 0
    seq_len = max(seq.shape[-1] for seq in sequences)
    if seq_len < 2:
        return 0, 0
    user_tokens = sum(seq.numel() for seq in sequences)
    return max(1, math.ceil(fraction / (1.0 - fraction) * user_tokens / seq_len)), seq_len


def mix_generated_calibration(
    model: nn.Module,
    sequences: Sequence[Tensor],
    fraction: float,
    seed: int = 0,
    num_threads: int | None = 1,
    on_token: Callable[[], None] | None = None,
) -> list[Tensor]:
    """The user's sequences plus generated ones making up ``fraction`` of all calibration tokens.

    Generated sequences are as long as the user's longest (so statistics averaged per token weigh the two sets by
    their token counts) and start from the model's BOS token, or, for a model without one, from the user
    sequences' first tokens.

    Args:
        model: the causal LM being compressed.
        sequences: ``(1, seq_len)`` user token-id tensors (see ``prepare_calibration``).
        fraction: share of generated tokens in the mix, in ``[0, 1)``; 0 returns ``sequences`` unchanged.
        seed: sampling seed.
        num_threads: torch thread count while sampling.
        on_token: called after each sampling step (``seq_len - 1`` steps in all), for progress.

    Returns:
        The user's sequences followed by the generated ones.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"generated calibration fraction must be in [0, 1), got {fraction}")
    sequences = list(sequences)
    count, seq_len = generated_count(sequences, fraction)
    if count == 0:
        return sequences
    start = _start_token(model)
    if start is None:
        firsts = torch.stack([seq.reshape(-1)[0] for seq in sequences])
        starts = firsts[torch.arange(count) % firsts.numel()]
    else:
        starts = torch.full((count,), start, dtype=torch.long)
    return sequences + generate_calibration(model, count, seq_len, starts, seed, num_threads, on_token)
