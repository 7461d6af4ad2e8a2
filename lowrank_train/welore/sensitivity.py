"""How much the language-model loss reacts to each linear layer's output: the weights of loss-based allocation.

For a small output error ``dy`` at layer ``i`` the loss grows by about ``1/2 dy^T H_i dy``. With the empirical
Fisher ``E[g g^T]`` (``g = dL/dy``) standing in for ``H_i`` and its trace spread evenly over the outputs, the
increase is ``1/2 s_i E ||dy||^2`` with ``s_i = E ||g||^2 / out``: the output error energy that a truncation
causes (its whitened tail energy, see :func:`~lowrank_train.welore.allocation.truncation_losses`) times one scalar
per layer. Without ``s_i`` the errors of different layers are in different units (the residual stream grows with
depth, attention scores and MLP gates react differently), which is why a knapsack on raw or relative output error
allocates badly (issue 16).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_train.welore.spectrum import InputStatistics, collect_input_statistics, limit_threads

__all__ = ["collect_calibration_statistics", "collect_output_sensitivity"]


def _input_embedding(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if isinstance(embedding, nn.Module):
        return embedding
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise ValueError("cannot measure output sensitivity: the model has no input embedding (nn.Embedding)")


def _logits(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(f"cannot find logits in the model's output of type {type(output).__name__}")


def collect_output_sensitivity(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    calibration: Sequence[Tensor],
    num_threads: int | None = 1,
    on_sequence: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Per linear, ``E_t ||dL_t / dy_t||^2 / out_features`` over the calibration tokens (next-token loss).

    One forward and one backward pass per sequence. The gradient is taken with respect to the input embedding's
    output only (``torch.autograd.grad``), so no parameter gradient is computed or accumulated and
    ``requires_grad`` flags stay as they are; the layers' outputs are read by tensor hooks on the way.

    Args:
        model: a causal LM returning logits (a tensor, a tuple starting with them, or an object with
            ``.logits``), called as ``model(input_ids)``.
        linears: the layers to measure, by name.
        calibration: ``(1, seq_len)`` token-id tensors with ``seq_len >= 2``.
        num_threads: torch thread count during the passes (``None`` keeps the current one).
        on_sequence: called after each sequence's passes (progress).

    Returns:
        Sensitivity per linear name, ``>= 0``.

    Raises:
        ValueError: no sequence of at least two tokens, a model without an input embedding or logits, or a
            linear that the passes never reached.
    """
    sequences = [seq.reshape(1, -1) for seq in calibration if seq.numel() >= 2]
    if not sequences:
        raise ValueError("output sensitivity needs calibration sequences of at least two tokens")
    device = next(model.parameters()).device
    sums = dict.fromkeys(linears, 0.0)
    counts = dict.fromkeys(linears, 0)
    embedded: list[Tensor] = []

    def make_output_hook(name: str):
        def hook(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            if not output.requires_grad:
                return

            def read(grad: Tensor) -> None:
                flat = grad.detach().reshape(-1, grad.shape[-1]).double()
                sums[name] += float(flat.square().sum())
                counts[name] += flat.shape[0]

            output.register_hook(read)

        return hook

    def embedding_hook(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        # A fresh leaf that requires grad: the graph to differentiate exists even for a frozen model.
        leaf = output.detach().requires_grad_(True)
        embedded.append(leaf)
        return leaf

    handles = [linear.register_forward_hook(make_output_hook(name)) for name, linear in linears.items()]
    handles.append(_input_embedding(model).register_forward_hook(embedding_hook))
    was_training = model.training
    model.eval()
    try:
        with limit_threads(num_threads), torch.enable_grad():
            for input_ids in sequences:
                embedded.clear()
                input_ids = input_ids.to(device).long()
                logits = _logits(model(input_ids))
                # Summed, not averaged, over tokens: the per-token gradient must not shrink with the length.
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1), reduction="sum"
                )
                torch.autograd.grad(loss, embedded)
                if on_sequence is not None:
                    on_sequence()
    finally:
        embedded.clear()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    never = [name for name, count in counts.items() if count == 0]
    if never:
        raise ValueError(f"linear {never[0]!r} was never reached by the sensitivity pass ({len(never)} in all)")
    return {name: sums[name] / (counts[name] * linears[name].out_features) for name in linears}


def collect_calibration_statistics(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    calibration: Sequence[Tensor],
    num_threads: int | None = 1,
    output_sensitivity: bool = True,
) -> dict[str, InputStatistics]:
    """Input statistics plus (by default) output sensitivities: everything any strategy reads, in two passes.

    Pass the result to :func:`~lowrank_train.welore.compress.compress_model` as ``calibration`` to compress at
    several targets or with several strategies from one measurement.

    Args:
        model: the model containing ``linears``.
        linears: the layers to measure, by name.
        calibration: ``(1, seq_len)`` token-id tensors.
        num_threads: torch thread count during the passes.
        output_sensitivity: also run :func:`collect_output_sensitivity` (a backward pass per sequence).

    Returns:
        Statistics per linear name.
    """
    stats = collect_input_statistics(model, linears, calibration, num_threads)
    if not output_sensitivity:
        return stats
    sensitivity = collect_output_sensitivity(model, linears, calibration, num_threads)
    return {name: replace(entry, output_sensitivity=sensitivity[name]) for name, entry in stats.items()}
