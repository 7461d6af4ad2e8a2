"""Peak memory of one training step: ordinary loop vs LayerwiseOptimizer, gradient accumulation 1 and 4.

Model: a randomly initialised LLaMA of the GaLore paper's 60M shape (hidden 512, intermediate 1376, 8 layers,
8 heads, vocab 32000), fp32, on the CPU. Optimizers: torch AdamW, and GaLoreAdamW (rank 128 on every linear
weight of the blocks; embeddings, norms and the head full-rank).

How memory is measured (no CUDA allocator needed): a TorchDispatchMode sees every tensor that every op
creates, forward and backward (the layer-wise hooks and the optimizer steps included); it keeps a weak
reference to each tensor storage and adds its bytes while the storage lives. Parameters and optimizer state
that exist before the step are registered at the start. "peak step" is the maximum over the step of the
bytes of all live storages (parameters, optimizer state, activations, gradients, temporaries). "peak grads"
is measured separately by a post-accumulate-grad hook that runs before the optimizer's: the bytes of all live
``.grad`` tensors plus GaLore's projected accumulators each time a gradient lands. Allocator caching and
fragmentation are not included: these are the bytes the tensors need. The first step (which creates the
optimizer state and the GaLore bases) is a warm-up; the second is measured.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/layerwise_memory.py`` (about 2 minutes on one core).
"""

from __future__ import annotations

import argparse
import copy
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowrank_train import GaLoreAdamW, lowrank_param_groups
from lowrank_train.optim.layerwise import LayerwiseOptimizer

MIB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of every live tensor storage created by ops (or registered) while active."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def register(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is storage:
            return
        nbytes = storage.nbytes()

        def release(_ref: weakref.ref, key: int = key, nbytes: int = nbytes) -> None:
            self._live.pop(key, None)
            self.current -= nbytes

        self._live[key] = (weakref.ref(storage, release), nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self.register(tensor)
        return out


def llama_60m(seq_len: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=max(seq_len, 256),
    )
    return LlamaForCausalLM(config)


def optimizer_setup(kind: str, model: nn.Module, rank: int) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    if kind == "AdamW":
        return [{"params": list(model.parameters())}], lambda g: torch.optim.AdamW(g, lr=1e-3)
    groups = lowrank_param_groups(model, rank=rank, update_gap=200, scale=0.25)
    return groups, lambda g: GaLoreAdamW(g, lr=1e-3)


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for t in tree_flatten(opt.state_dict())[0] if isinstance(t, torch.Tensor)]


def grad_tracker(model: nn.Module, opt_ref: list[Any]) -> list[int]:
    """Peak bytes of live .grad + GaLore accumulators, sampled as each gradient lands (before the engine's hook)."""
    peak = [0]
    params = list(model.parameters())

    def measure(_param: torch.Tensor) -> None:
        live = sum(p.grad.nbytes for p in params if p.grad is not None)
        opt = opt_ref[0]
        inners = (
            [opt.inner_optimizer(p) for p in params] if isinstance(opt, LayerwiseOptimizer) else [opt] * len(params)
        )
        for p, inner in zip(params, inners, strict=True):
            accumulator = inner.state.get(p, {}).get("grad_accum")
            live += accumulator.nbytes if accumulator is not None else 0
        peak[0] = max(peak[0], live)

    for p in params:
        p.register_post_accumulate_grad_hook(measure)
    return peak


def train_step(model: nn.Module, opt: Any, tokens: list[torch.Tensor], layerwise: bool) -> None:
    # The ordinary loop accumulates full gradients in .grad (the common practice) and steps once.
    accumulation = len(tokens)
    for batch in tokens:
        loss = model(input_ids=batch, labels=batch).loss / accumulation
        loss.backward()
        del loss
    if not layerwise:
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(base: nn.Module, kind: str, layerwise: bool, accumulation: int, args: argparse.Namespace) -> dict:
    model = copy.deepcopy(base)
    groups, make = optimizer_setup(kind, model, args.rank)
    opt_ref: list[Any] = [None]
    grad_peak = grad_tracker(model, opt_ref)
    opt = LayerwiseOptimizer(groups, make, accumulation_steps=accumulation) if layerwise else make(groups)
    opt_ref[0] = opt
    generator = torch.Generator().manual_seed(0)
    steps = [
        [torch.randint(0, 32000, (args.batch, args.seq_len), generator=generator) for _ in range(accumulation)]
        for _ in range(2)
    ]
    train_step(model, opt, steps[0], layerwise)  # warm-up: creates optimizer state and GaLore bases
    grad_peak[0] = 0
    tracker = LiveTensorBytes()
    param_bytes = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    state = state_tensors(opt)
    state_bytes = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in state}.values())
    with tracker:
        for tensor in [*model.parameters(), *model.buffers(), *state, *steps[1]]:
            tracker.register(tensor)
        train_step(model, opt, steps[1], layerwise)
    if isinstance(opt, LayerwiseOptimizer):
        opt.remove_hooks()
    return {
        "optimizer": kind if kind == "AdamW" else f"GaLoreAdamW r={args.rank}",
        "loop": "layer-wise" if layerwise else "ordinary",
        "accumulation": accumulation,
        "params": param_bytes / MIB,
        "state": state_bytes / MIB,
        "grads": grad_peak[0] / MIB,
        "peak": tracker.peak / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = llama_60m(args.seq_len)
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"LLaMA 60M shape ({n_params / 1e6:.1f}M params, fp32), micro-batch {args.batch} x {args.seq_len} tokens, "
        f"CPU, torch {torch.__version__}. Peaks in MiB of live tensor bytes (TorchDispatchMode storage tracker)."
    )
    rows = []
    for kind in ("AdamW", "GaLore"):
        for accumulation in (1, 4):
            for layerwise in (False, True):
                rows.append(measure(base, kind, layerwise, accumulation, args))
    header = (
        "| optimizer | loop | accumulation | params | optimizer state | peak grads (+accumulators) | peak step "
        "(all live tensors) | peak above params + state | saved vs ordinary |"
    )
    print(header)
    print("|" + "---|" * 9)
    for row in rows:
        twin = next(
            r
            for r in rows
            if r["optimizer"] == row["optimizer"]
            and r["accumulation"] == row["accumulation"]
            and r["loop"] == "ordinary"
        )
        print(
            f"| {row['optimizer']} | {row['loop']} | {row['accumulation']} | {row['params']:.1f} | {row['state']:.1f} "
            f"| {row['grads']:.1f} | {row['peak']:.1f} | {row['peak'] - row['params'] - row['state']:.1f} "
            f"| {twin['peak'] - row['peak']:.1f} |"
        )


if __name__ == "__main__":
    main()
