"""Host synchronisations and CPU time of a layer-wise step with GaLore inner optimizers (issue 19 item 3).

Model: the block weights of the LLaMA-60M shapes (8 layers x q, k, v, o, gate, up, down, rank 128) and their RMSNorm
weights (plain AdamW inside GaLore), each fed its own small input, so every parameter gets a gradient and a hook.

Synchronisations are counted, not timed: on a GPU every tensor -> Python conversion (``bool``, ``int``, ``float``,
``item``, ``tolist``) waits for the device. The counter patches those methods and leaves out the optimizer-state
tensors kept on the CPU by design (the step counters), whose reads never wait. The count is deterministic, so it
holds on this noisy CPU machine. Step 0 builds the bases (their SVDs synchronise anyway); later steps are the
steady state. Time is the median CPU seconds of this process over the steady-state steps.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/layerwise_syncs.py`` (about a minute on one core).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from common import LLAMA_SHAPES, llama_weight_shapes, markdown_table, set_threads
from torch import nn

from lowrank_train import GaLoreAdamW
from lowrank_train.optim.layerwise import LayerwiseOptimizer

CONVERSIONS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
BATCH = 4


class BlockWeights(nn.Module):
    """The 60M block weights without the layers between them: loss = sum of mean squares of ``x_W @ W^T``."""

    def __init__(self, size: str, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        shapes = [(n, s) for n, s in llama_weight_shapes(size) if n.startswith("layers.")]
        self.names = [n.replace(".", "_") for n, _ in shapes]
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s) * 0.02) for _, s in shapes)
        self.inputs = [torch.randn(BATCH, s[-1]) for _, s in shapes]

    def loss(self) -> torch.Tensor:
        pairs = zip(self.weights, self.inputs, strict=True)
        terms = [(x @ w.T if w.dim() == 2 else x * w).square().mean() for w, x in pairs]
        return torch.stack(terms).sum()


def engine_for(model: BlockWeights, accumulation: int, rank: int) -> LayerwiseOptimizer:
    params = list(model.weights)
    groups = [
        {"params": [p for p in params if p.dim() == 2], "rank": rank, "update_gap": 10_000, "scale": 0.25},
        {"params": [p for p in params if p.dim() < 2]},
    ]
    return LayerwiseOptimizer(groups, lambda g: GaLoreAdamW(g, lr=1e-3), accumulation_steps=accumulation)


def host_state(engine: LayerwiseOptimizer, params: list[torch.Tensor]) -> set[int]:
    """ids of the optimizer-state tensors that live on the CPU (reading them never waits for a GPU)."""
    found = set()
    for p in params:
        inner = engine.inner_optimizer(p)
        for states in (inner.state, getattr(getattr(inner, "base_optimizer", None), "state", {})):
            for state in states.values():
                found.update(id(v) for v in state.values() if torch.is_tensor(v) and v.device.type == "cpu")
    return found


@contextmanager
def counting(engine: LayerwiseOptimizer, params: list[torch.Tensor]) -> Iterator[collections.Counter]:
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counted(name: str):
        def conversion(tensor: torch.Tensor, *args, **kwargs):
            if id(tensor) not in host_state(engine, params):
                counts[name] += 1
            return originals[name](tensor, *args, **kwargs)

        return conversion

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def run(size: str, accumulation: int, rank: int, steps: int) -> list[object]:
    model = BlockWeights(size, seed=0)
    params = list(model.weights)
    engine = engine_for(model, accumulation, rank)
    syncs, seconds = [], []
    for _ in range(steps):
        with counting(engine, params) as counts:
            for _ in range(accumulation):
                (model.loss() / accumulation).backward()
        syncs.append(sum(counts.values()))
        start = time.process_time()  # timed again without the counter, which costs more than it measures
        for _ in range(accumulation):
            (model.loss() / accumulation).backward()
        seconds.append(time.process_time() - start)
    engine.remove_hooks()
    n = len(params)
    steady = syncs[1:]
    return [
        accumulation,
        n,
        syncs[0],
        f"{statistics.median(steady)} ({statistics.median(steady) / n:.2f})",
        f"{statistics.median(seconds[1:]) * 1e3:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="60m", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="steps per setting; the first builds the bases")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    rows = [run(args.size, a, args.rank, args.steps) for a in (1, 4)]
    header = ["accumulation", "parameters", "syncs in step 0", "syncs per step (per parameter)", "CPU ms per step"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
