"""Optimizer-state bytes of APOLLO / APOLLO-Mini / Fira next to GaLore and AdamW (issue 21).

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/apollo_memory.py [--size 60m] [--rank 128]

Prints (and writes to benchmarks/results/apollo_memory.md) the optimizer state of a LLaMA-shaped parameter set
(bf16, untied head), measured: every parameter gets a random gradient, the optimizer takes one step, and every
distinct tensor storage of its state (the inner optimizer's included) is counted, split into the block linears
(the low-rank group) and the rest (embeddings, head, norms: full AdamW state in every method). The estimator's
figure (lowrank_train.estimate_memory, optimizer states + bases) is printed next to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import LLAMA_SHAPES, llama_weight_shapes, markdown_table, mib, set_threads, tensor_bytes
from torch import nn

from lowrank_train.memory import estimate_memory
from lowrank_train.optim import APOLLOAdamW, APOLLOMini, FiraAdamW, GaLoreAdamW

RESULTS = Path(__file__).parent / "results" / "apollo_memory.md"


def _params(size: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    linear, rest = [], []
    for name, shape in llama_weight_shapes(size):
        p = nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16))
        (linear if "_proj" in name else rest).append(p)
    return linear, rest


def _measure(method: str, size: str, rank: int) -> tuple[int, int]:
    linear, rest = _params(size)
    if method == "adamw":
        opt = torch.optim.AdamW(linear + rest, lr=1e-3)
    else:
        cls = {"galore": GaLoreAdamW, "apollo": APOLLOAdamW, "apollo_mini": APOLLOMini, "fira": FiraAdamW}[method]
        opt = cls([{"params": linear, "rank": rank}, {"params": rest}], lr=1e-3)
    for p in linear + rest:
        p.grad = torch.randn_like(p)
    opt.step()
    base = opt.base_optimizer if method != "adamw" else opt
    seen: set[int] = set()
    linear_bytes = sum(tensor_bytes(opt.state.get(p, {}), seen) for p in linear)
    if method != "adamw":  # the inner optimizer's moments of the shadows (r x max(m, n))
        linear_bytes += sum(tensor_bytes(base.state.get(opt._shadows[p], {}), seen) for p in linear)
    rest_bytes = sum(tensor_bytes(base.state.get(p, {}), seen) for p in rest)
    return linear_bytes, rest_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="60m", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    set_threads(1)
    hidden, inter, layers, heads, vocab = LLAMA_SHAPES[args.size]
    model = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
             "num_attention_heads": heads, "vocab_size": vocab}  # fmt: skip
    rows = []
    for method in ("adamw", "galore", "fira", "apollo", "apollo_mini"):
        rank = 1 if method == "apollo_mini" else args.rank
        linear_bytes, rest_bytes = _measure(method, args.size, rank)
        est = estimate_memory(model, {"optimizer": method, "rank": args.rank, "dtype": "bfloat16"})
        rows.append([method, rank if method != "adamw" else "-", mib(linear_bytes), mib(rest_bytes),
                     mib(linear_bytes + rest_bytes), mib(est.optimizer_states + est.projection_bases)])  # fmt: skip
    table = markdown_table(
        ["method", "rank", "state: block linears", "state: embed/head/norms", "state: total", "estimator"], rows
    )
    text = f"LLaMA-{args.size} shapes, bf16 parameters, one step (`benchmarks/apollo_memory.py`):\n\n{table}\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
