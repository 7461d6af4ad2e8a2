"""Cross-entropy over the LM head, computed by chunks so that fp32 logits of the whole batch never exist.

Why (issue 8): LLaMA's loss upcasts the logits to fp32; at batch 16 x 256 and vocab 32000 that is 0.5 GB for the
log-probabilities alone, and backward holds two more tensors of that size. Here the forward walks over chunks of
tokens and keeps only each token's log-sum-exp (4 bytes a token); the backward recomputes the logits by chunks of
the vocabulary, so that each chunk of the head's gradient is written once, complete, in the weight's dtype (no fp32
copy of the (V, h) gradient is ever accumulated), and the fp32 gradient of the hidden states is summed over chunks.
Extra cost: the head's matmul runs twice (forward and backward recomputation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_train.nn.autocast import autocast_disabled, autocast_dtype


def _vocab_chunk(chunk_size: int, tokens: int, vocab: int) -> int:
    """Vocabulary slice whose (tokens x slice) logits are as large as a (chunk_size x vocab) forward chunk."""
    return max(1, min(vocab, chunk_size * vocab // max(tokens, 1)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Dtypes (see :mod:`lowrank_train.nn.autocast`): the head's matmuls run in the compute dtype (the autocast
    dtype when autocast is on for ``hidden``'s device, else ``hidden``'s dtype), in forward and in the backward
    recomputation alike, so both see the same logits; log-sum-exp and softmax are fp32, as LLaMA's loss upcasts.
    ``hidden`` is saved in the compute dtype, ``weight`` as it is (its slices are cast when used); the gradients
    come back in ``hidden``'s and ``weight``'s own dtypes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        chunk_size: int,
        ignore_index: int,
        reduction: str,
    ) -> Tensor:
        compute = autocast_dtype(hidden) or hidden.dtype
        tokens = hidden.shape[0]
        with autocast_disabled(hidden):
            hidden_compute, weight_compute = hidden.to(compute), weight.to(compute)
            valid = labels != ignore_index
            safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
            lse = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
            target = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
            for start in range(0, tokens, chunk_size):
                stop = min(start + chunk_size, tokens)
                logits = (hidden_compute[start:stop] @ weight_compute.mT).float()  # (chunk, V) fp32
                lse[start:stop] = torch.logsumexp(logits, dim=-1)
                target[start:stop] = logits.gather(1, safe_labels[start:stop, None]).squeeze(1)
                del logits
            del weight_compute
            losses = torch.where(valid, lse - target, torch.zeros_like(lse))
            count = valid.sum()
            loss = losses.sum() / count if reduction == "mean" else losses.sum()
        ctx.save_for_backward(hidden_compute, weight, labels, lse, count)
        ctx.chunk_size, ctx.ignore_index, ctx.reduction, ctx.hidden_dtype = (
            chunk_size,
            ignore_index,
            reduction,
            hidden.dtype,
        )
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, labels, lse, count = ctx.saved_tensors  # hidden in the compute dtype
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tokens, vocab = hidden.shape[0], weight.shape[0]
        with autocast_disabled(hidden):
            valid = labels != ctx.ignore_index
            scale = grad_loss.float() / count if ctx.reduction == "mean" else grad_loss.float()
            row_scale = valid.float() * scale  # (tokens,): 0 for ignored tokens
            grad_hidden = torch.zeros(tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
            grad_weight = torch.empty_like(weight) if need_weight else None
            rows = torch.arange(tokens, device=hidden.device)
            step = _vocab_chunk(ctx.chunk_size, tokens, vocab)
            for start in range(0, vocab, step):
                stop = min(start + step, vocab)
                weight_slice = weight[start:stop].to(hidden.dtype)
                # softmax(logits) - onehot(label), restricted to this vocabulary slice, times d loss / d token loss.
                probs = (hidden @ weight_slice.mT).float().sub_(lse[:, None]).exp_()
                hit = valid & (labels >= start) & (labels < stop)
                probs[rows[hit], labels[hit] - start] -= 1.0
                grad_logits = probs.mul_(row_scale[:, None]).to(hidden.dtype)
                del probs
                if need_weight:
                    grad_weight[start:stop] = grad_logits.mT @ hidden  # cast to the weight's dtype on write
                if need_hidden:
                    grad_hidden.add_(grad_logits @ weight_slice)
                del grad_logits, weight_slice
        return (grad_hidden.to(ctx.hidden_dtype) if need_hidden else None), grad_weight, None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), labels)`` without materialising the full logits.

    Args:
        hidden: ``(..., h)`` final hidden states (any float dtype).
        weight: ``(V, h)`` LM head (or tied embedding) weight, same dtype as ``hidden`` unless autocast is on
            (then both are cast to the autocast dtype for the matmuls, as ``nn.Linear`` is).
        labels: ``(...)`` int64 targets matching ``hidden``'s leading dims; ``ignore_index`` entries are skipped.
        chunk_size: tokens per forward chunk; the backward uses vocabulary slices of the same element count.
            Peak extra memory is about two fp32 ``(chunk_size, V)`` tensors.
        ignore_index: label value that contributes no loss.
        reduction: "mean" (over non-ignored tokens; NaN when there are none, like ``F.cross_entropy``) or "sum".

    Returns:
        fp32 scalar loss.

    Raises:
        ValueError: mismatched shapes or dtypes (outside autocast), a bad ``chunk_size`` or ``reduction``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., h) and weight (V, h) disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match hidden's leading dims {hidden.shape[:-1]}"
        )
    if hidden.dtype != weight.dtype and autocast_dtype(hidden) is None:
        raise ValueError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them first (or run under autocast, "
            "which computes the head in its own dtype)"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedCrossEntropy.apply(
        flat_hidden, weight, labels.reshape(-1).long(), chunk_size, ignore_index, reduction
    )


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> Tensor:
    """Next-token loss of a Hugging Face causal LM through :func:`chunked_cross_entropy`.

    Same value as ``model(input_ids, labels=labels).loss`` (labels shifted left by one, the last position ignored)
    but the model's body runs alone and the head is applied by chunks, so the ``(batch, seq, V)`` logits never exist.

    Args:
        model: a ``*ForCausalLM`` with ``get_decoder()`` and ``get_output_embeddings()`` (a bias-free head).
        input_ids: ``(batch, seq)`` token ids.
        labels: ``(batch, seq)`` targets, unshifted; defaults to ``input_ids``.
        attention_mask: optional ``(batch, seq)`` mask passed to the body.
        chunk_size: tokens per chunk.
        ignore_index: label value that is skipped.

    Returns:
        fp32 scalar mean loss.

    Raises:
        ValueError: when the model has no separate body / head or its head has a bias.
    """
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not callable(get_decoder) or head is None:
        raise ValueError(f"{type(model).__name__} has no get_decoder()/get_output_embeddings(): not a causal LM")
    if getattr(head, "bias", None) is not None:
        raise ValueError("the output head has a bias; chunked_cross_entropy supports bias-free heads only")
    hidden = get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    labels = input_ids if labels is None else labels
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return chunked_cross_entropy(hidden, head.weight, shifted, chunk_size=chunk_size, ignore_index=ignore_index)
