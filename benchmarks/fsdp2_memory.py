"""Per-rank memory under FSDP2 on CPU processes next to ``estimate --nproc N`` (issue 22 item 5).

Runs the same small LLaMA (GaLore around AdamW, bf16, ``fully_shard`` on every block and on the root) in one process
and in N gloo processes (``torch.distributed.run``), one training step each on the same global batch, and prints
each rank's live bytes (local shards of the weights, the optimizer's tensors) and process peak RSS next to the
estimator's per-rank figures.

Usage::

    python benchmarks/fsdp2_memory.py --nproc 2     # writes benchmarks/results/fsdp2_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS = Path(__file__).parent / "results" / "fsdp2_memory.md"
GIB = 1024**3
SHAPE = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2736,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=16,
)
# --tiny: the same check in seconds (tests/test_memory.py runs it on 2 processes).
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
RANK = 128
GLOBAL_BATCH, SEQ = 4, 256


def shape(tiny: bool = False) -> dict:
    return TINY if tiny else SHAPE


def rank_of(tiny: bool = False) -> int:
    return 8 if tiny else RANK


def setup(world: int, tiny: bool = False) -> dict:
    """The estimator's setup for the run each process makes (its share of the global batch)."""
    return dict(
        batch_size=GLOBAL_BATCH // world,
        seq_len=16 if tiny else SEQ,
        dtype="bfloat16",
        optimizer="galore",
        rank=rank_of(tiny),
        projector="random",
        world_size=world,
        device="cpu",
    )


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(out: Path, tiny: bool = False) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_train import lowrank_param_groups
    from lowrank_train.memory.measure import _iter_tensors
    from lowrank_train.optim import GaLoreAdamW

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        from lowrank_train.integrations.fsdp import FSDP2GaLore

        dist.init_process_group("gloo")
    baseline = _rss()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape(tiny), use_cache=False)).to(torch.bfloat16)
    if world > 1:
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    groups = lowrank_param_groups(model, rank=rank_of(tiny), projector="random")
    optimizer = (FSDP2GaLore if world > 1 else GaLoreAdamW)(groups, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape(tiny)["vocab_size"], (GLOBAL_BATCH, setup(1, tiny)["seq_len"]), generator=gen)
    share = GLOBAL_BATCH // world
    mine = ids[rank * share : (rank + 1) * share]
    loss = model(input_ids=mine, labels=mine).loss  # through the root's forward: FSDP2 unshards its parameters
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    seen: set[int] = set()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    weights = nbytes(local(p) for p in [*model.parameters(), *model.buffers()])
    states = nbytes(t for _, t in _iter_tensors(optimizer.state_dict()))
    result = {"rank": rank, "world": world, "baseline_rss": baseline, "peak_rss": _rss()}
    result.update(weights=weights, optimizer_states=states, loss=float(loss.detach()))
    with open(out.with_suffix(f".rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    if world > 1:
        from lowrank_train.train.parallel import end_process_group

        del model, optimizer, groups, loss
        end_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model (seconds)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.tiny)
        return
    from lowrank_train.memory import estimate_memory

    tmp = Path(tempfile.mkdtemp(prefix="fsdp2_memory_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for world in (1, args.nproc):
        out = tmp / f"world{world}"
        if world == 1:
            cmd = [sys.executable, __file__, "--worker", str(out)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
            cmd += [__file__, "--worker", str(out)]
        print("running", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env=env)
        for rank in range(world):
            measured = json.loads(out.with_suffix(f".rank{rank}.json").read_text())
            rows.append((measured, estimate_memory(SHAPE, setup(world))))
    lines = [
        "# Per-rank memory under FSDP2 (CPU, gloo) vs `estimate --nproc N`",
        "",
        f"Command: `python benchmarks/fsdp2_memory.py --nproc {args.nproc}`. Model: LLaMA h {SHAPE['hidden_size']}, "
        f"f {SHAPE['intermediate_size']}, {SHAPE['num_hidden_layers']} layers, vocab {SHAPE['vocab_size']}, bf16; "
        f"GaLore (AdamW inside, rank {RANK}, random projector; FSDP2GaLore on the sharded model); global batch "
        f"{GLOBAL_BATCH} x {SEQ}, split over the ranks; one step. `fully_shard` on every block and on the root.",
        "",
        "| processes | rank | live weights | est. weights | live optimizer states | est. states | peak RSS - import "
        "| est. peak | est. FSDP2 buffers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for measured, est in rows:
        lines.append(
            f"| {measured['world']} | {measured['rank']} | {measured['weights'] / 2**20:.1f} MiB | "
            f"{est.weights / 2**20:.1f} MiB | {measured['optimizer_states'] / 2**20:.1f} MiB | "
            f"{est.optimizer_states / 2**20:.1f} MiB | "
            f"{(measured['peak_rss'] - measured['baseline_rss']) / 2**20:.0f} MiB | {est.peak / 2**20:.0f} MiB | "
            f"{est.communication / 2**20:.0f} MiB |"
        )
    lines += [
        "",
        "Live bytes are each rank's local shards (DTensor `to_local()`) and the optimizer's tensors (replicated "
        "projected moments included); RSS includes the allocator's cache, the gloo buffers and whatever the CPU "
        "keeps of freed temporaries, which the estimator does not model.",
    ]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
