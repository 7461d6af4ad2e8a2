"""torchrun worker: trains a small model with GaLore under FSDP2 or DDP and saves the final full parameters.

Run as ``torchrun --standalone --nproc_per_node 2 distributed_worker.py OUT.pt CASE [CASE ...]``. A case is
``ENGINE-MODEL-METHOD-ACCUM``: ``fsdp2-mlp-svd-1``, ``ddp-mlp-svd-2``, ``fsdp2-llama-svd-1``...; METHOD is a GaLore
projector (``q<projector>`` adds the Q-GaLore options) or an update rule preset (``apollo``, ``apollomini``,
``fira``); ENGINE ``fsdp2lw`` steps layer-wise under FSDP2 (``fsdp2lwclip``: with per-parameter clipping, and the
gradient norms are saved under ``"norms"``); rank 0 writes ``{case: {name: full tensor}}``. The case
``placements`` checks that a column-sharded weight is refused; the case
``nonfinite`` reloads a sharded optimizer state (the load-time checks on DTensors) and puts a NaN into one rank's
gradient shard: every rank must skip (or refuse) the same step. The test
imports :func:`build_model`, :func:`global_batches`, :func:`make_optimizer` and :func:`train` to compute the
single-process reference on the same global batches.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

STEPS = 6
GLOBAL_BATCH = 8
DIMS = (24, 40, 13)  # MLP weights 40x24 (basis on the unsharded side), 13x40 (sharded side, uneven rows), 13x13


def build_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
        return LlamaForCausalLM(config)
    return nn.Sequential(
        nn.Linear(DIMS[0], DIMS[1]),
        nn.LayerNorm(DIMS[1]),
        nn.Tanh(),
        nn.Linear(DIMS[1], DIMS[2]),
        nn.Tanh(),
        nn.Linear(DIMS[2], DIMS[2], bias=False),
    )


def global_batches(kind: str, accum: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """STEPS steps of ``accum`` micro-batches of GLOBAL_BATCH rows: (inputs, targets)."""
    generator = torch.Generator().manual_seed(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "llama":
            ids = torch.randint(0, 256, (GLOBAL_BATCH, 16), generator=generator)
            return ids, ids
        return torch.randn(GLOBAL_BATCH, DIMS[0], generator=generator), torch.randn(
            GLOBAL_BATCH, DIMS[2], generator=generator
        )

    return [[batch() for _ in range(accum)] for _ in range(STEPS)]


PRESETS = ("apollo", "apollomini", "fira")
GAMMA = 1.001  # a tight norm-growth limiter bites on many steps: its all-reduced norm is exercised
CLIP = 0.05  # fsdp2lwclip: per-parameter clip threshold (below most gradient norms here)


def param_groups(model: nn.Module, method: str) -> list[dict]:
    """Low-rank groups (rank 4, refresh every 3 steps); ``q<projector>`` adds Q-GaLore's INT4 basis, adaptive gap."""
    from lowrank_train.optim import lowrank_param_groups

    options = {}
    if method in PRESETS:
        method = "svd"  # the presets write their own projector
    elif method.startswith("q"):
        method = method[1:]
        options = dict(
            proj_bits=4, proj_group_size=16, adaptive_refresh=True, refresh_history=2, refresh_threshold=0.01
        )
    return lowrank_param_groups(model, rank=4, update_gap=3, scale=0.5, projector=method, **options)


def optimizer_factory(method: str, sharded: bool):
    """Builds the optimizer over given groups: GaLore with AdamW, or an APOLLO / APOLLO-Mini / Fira preset."""
    from lowrank_train.integrations.fsdp import FSDP2Backend
    from lowrank_train.optim import APOLLOAdamW, APOLLOMini, FiraAdamW, GaLore

    backend = {"backend": FSDP2Backend()} if sharded else {}
    if method in PRESETS:
        cls = {"apollo": APOLLOAdamW, "apollomini": APOLLOMini, "fira": FiraAdamW}[method]
        return lambda groups: cls(groups, lr=1e-2, weight_decay=0.1, norm_growth_limit=GAMMA, **backend)
    return lambda groups: GaLore(groups, base="adamw", lr=1e-2, weight_decay=0.1, **backend)


def make_optimizer(model: nn.Module, method: str, sharded: bool) -> torch.optim.Optimizer:
    return optimizer_factory(method, sharded)(param_groups(model, method))


def make_layerwise(model: nn.Module, method: str, sharded: bool, accum: int, clip: bool):
    """The layer-wise engine over the same groups (``fsdp2_layerwise`` for a sharded model)."""
    from lowrank_train.optim import LayerwiseOptimizer

    options = dict(accumulation_steps=accum, max_grad_norm=CLIP if clip else None, clip_mode="per-param")
    factory = optimizer_factory(method, sharded)
    if sharded:
        from lowrank_train.integrations.fsdp import fsdp2_layerwise

        return fsdp2_layerwise(param_groups(model, method), factory, **options)
    return LayerwiseOptimizer(param_groups(model, method), factory, **options)


def loss_of(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if inputs.dtype == torch.long:
        return model(input_ids=inputs, labels=targets).loss
    return nn.functional.mse_loss(model(inputs), targets)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches, shard: slice) -> None:
    """The loop both runs share: ``accum`` micro-batches per step, mean loss over this process's rows."""
    lowrank = [p for group in optimizer.param_groups for p in group["params"] if optimizer.accumulates_projected(p)]
    for step in batches:
        for i, (inputs, targets) in enumerate(step):
            (loss_of(model, inputs[shard], targets[shard]) / len(step)).backward()
            if i < len(step) - 1:  # low-rank accumulation: the projected gradient replaces the full one
                for p in lowrank:
                    optimizer.accumulate_grad(p)
        optimizer.step()
        optimizer.zero_grad()


def train_layerwise(model: nn.Module, engine, batches, shard: slice) -> torch.Tensor:
    """The same loop for the layer-wise engine (steps happen inside backward); returns the per-step grad norms."""
    norms = []
    for step in batches:
        for inputs, targets in step:
            (loss_of(model, inputs[shard], targets[shard]) / len(step)).backward()
        assert engine.micro_step == 0 and all(p.grad is None for p in model.parameters())
        norms.append(engine.last_grad_norm.detach().clone())
    return torch.stack(norms)


def run_case(case: str) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_train.integrations.fsdp import FSDP2Backend

    engine, kind, projector, accum = case.split("-")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_BATCH // world
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    model = build_model(kind)
    if engine.startswith("fsdp2"):
        blocks = model.model.layers if kind == "llama" else [m for m in model if isinstance(m, nn.Linear)]
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        trained = model
    elif engine == "ddp":
        trained = DistributedDataParallel(model)
    else:
        raise ValueError(f"unknown engine {engine!r}")
    found = {}
    if engine.startswith("fsdp2lw"):
        layerwise = make_layerwise(model, projector, True, int(accum), clip=engine == "fsdp2lwclip")
        # Runs after the engine's hook, right after each reduce-scatter: counts the sharded gradients alive then.
        # (Inside backward model.parameters() yields FSDP2's unsharded parameters: keep the sharded ones here.)
        sharded, live = list(model.parameters()), [0]

        def count_live(_param: torch.Tensor) -> None:
            live[0] = max(live[0], sum(q.grad is not None for q in sharded))

        handles = [p.register_post_accumulate_grad_hook(count_live) for p in sharded]
        found["norms"] = train_layerwise(model, layerwise, global_batches(kind, int(accum)), shard)
        found["live_grads"] = torch.tensor(live[0])
        for handle in handles:
            handle.remove()
        layerwise.remove_hooks()
    else:
        optimizer = make_optimizer(model, projector, sharded=engine == "fsdp2")
        assert isinstance(optimizer.backend, FSDP2Backend) == (engine == "fsdp2")
        train(trained, optimizer, global_batches(kind, int(accum)), shard)
    for name, p in model.named_parameters():
        found[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return found


def check_placements() -> None:
    """A column-sharded (tensor-parallel) weight must be refused with a message naming the supported layouts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowrank_train.integrations.fsdp import FSDP2GaLore

    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    weight = nn.Parameter(distribute_tensor(torch.randn(8, 16), mesh, [Shard(1)]))
    try:
        FSDP2GaLore([{"params": [weight], "rank": 2}], lr=1e-3)
    except ValueError as err:
        assert "Shard(0) and Replicate() only" in str(err), err
    else:
        raise AssertionError("a Shard(1) weight was accepted")


def check_nonfinite() -> dict[str, torch.Tensor]:
    """A NaN on rank 1 only: both ranks agree (one all-reduce of the flags), skip or refuse, and change nothing."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from lowrank_train.integrations.fsdp import FSDP2GaLore
    from lowrank_train.optim import lowrank_param_groups

    rank = dist.get_rank()
    model = build_model("mlp")
    for block in [m for m in model if isinstance(m, nn.Linear)]:
        fully_shard(block)
    fully_shard(model)
    results: dict[str, torch.Tensor] = {}
    # 0.weight (40 x 24) is checked through its gradient shard; 3.weight (13 x 40, basis on the sharded rows) through
    # its all-reduced projection, which carries rank 1's NaN to rank 0 too.
    for policy, poisoned in (("skip", 0), ("raise", 0), ("skip-rows", 3), ("raise-rows", 3)):
        groups = lowrank_param_groups(model, rank=4, update_gap=3, scale=0.5)
        optimizer = FSDP2GaLore(groups, lr=1e-2, nonfinite=policy.split("-")[0])
        batches = global_batches("mlp", 1)
        train(model, optimizer, batches[:2], slice(rank * 4, rank * 4 + 4))
        resumed = FSDP2GaLore(
            lowrank_param_groups(model, rank=4, update_gap=3, scale=0.5), lr=1e-2, nonfinite=policy.split("-")[0]
        )
        resumed.load_state_dict(optimizer.state_dict())  # the shape checks run on sharded parameters
        inputs, targets = batches[2][0]
        loss_of(model, inputs[rank * 4 : rank * 4 + 4], targets[rank * 4 : rank * 4 + 4]).backward()
        if rank == 1:
            model[poisoned].weight.grad.to_local().view(-1)[0] = float("nan")
        before = [p.to_local().clone() for p in model.parameters()]
        raised = False
        try:
            resumed.step()
        except ValueError as err:
            raised = f"{poisoned}.weight" in str(err) and "nothing was applied" in str(err)
        unchanged = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before, strict=True))
        resumed.zero_grad()
        results[policy] = torch.tensor([resumed.skipped_steps, int(raised), int(unchanged)])
    return results


def check_layerwise_nonfinite() -> torch.Tensor:
    """Layer-wise under FSDP2, a NaN in rank 1's shard of ``0.weight`` only: every rank skips that weight alone.

    Returns:
        [skipped_updates, 0.weight unchanged in the poisoned step, every other parameter moved] on this rank.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    model = build_model("mlp")
    for block in [m for m in model if isinstance(m, nn.Linear)]:
        fully_shard(block)
    fully_shard(model)
    poison = [False]

    def poison_rank1(param: torch.Tensor) -> None:  # registered before the engine's hook: runs first
        if poison[0] and rank == 1:
            param.grad.to_local().view(-1)[0] = float("nan")

    handle = model[0].weight.register_post_accumulate_grad_hook(poison_rank1)
    from lowrank_train.integrations.fsdp import FSDP2Backend, fsdp2_layerwise
    from lowrank_train.optim import GaLore

    engine = fsdp2_layerwise(
        param_groups(model, "rsvd"),
        lambda groups: GaLore(groups, lr=1e-2, backend=FSDP2Backend()),
        nonfinite="skip",
    )
    batches = global_batches("mlp", 1)
    shard = slice(rank * 4, rank * 4 + 4)
    train_layerwise(model, engine, batches[:1], shard)
    before = [p.to_local().clone() for p in model.parameters()]
    poison[0] = True
    train_layerwise(model, engine, batches[1:2], shard)
    after = [p.to_local() for p in model.parameters()]
    handle.remove()
    engine.remove_hooks()
    moved = all(not torch.equal(a, b) for a, b in zip(after[1:], before[1:], strict=True))
    return torch.tensor([engine.skipped_updates, int(torch.equal(after[0], before[0])), int(moved)])


def check_layerwise_resume() -> torch.Tensor:
    """Layer-wise under FSDP2: 3 steps, state_dict through torch.save / torch.load(weights_only=True) into a fresh
    engine on a fresh sharded model, 3 more steps == 6 uninterrupted steps, bit for bit on this rank.

    Returns:
        [resumed equals uninterrupted, the state held DTensor moments] on this rank.
    """
    import io

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    shard = slice(rank * 4, rank * 4 + 4)
    batches = global_batches("mlp", 2)

    def sharded_model() -> nn.Module:
        model = build_model("mlp")
        for block in [m for m in model if isinstance(m, nn.Linear)]:
            fully_shard(block)
        fully_shard(model)
        return model

    def run(model, steps):
        engine = make_layerwise(model, "rsvd", True, 2, clip=False)
        train_layerwise(model, engine, steps, shard)
        return engine

    straight = sharded_model()
    run(straight, batches).remove_hooks()
    first = sharded_model()
    engine = run(first, batches[:3])
    buffer = io.BytesIO()
    torch.save(engine.state_dict(), buffer)
    engine.remove_hooks()
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    has_dtensor = any(
        isinstance(v, DTensor) for inner in state["inner"] for s in inner["base"]["state"].values() for v in s.values()
    )
    second = sharded_model()
    with torch.no_grad():
        for p, q in zip(second.parameters(), first.parameters(), strict=True):
            p.to_local().copy_(q.to_local())
    resumed = make_layerwise(second, "rsvd", True, 2, clip=False)
    resumed.load_state_dict(state)
    train_layerwise(second, resumed, batches[3:], shard)
    resumed.remove_hooks()
    pairs = zip(second.parameters(), straight.parameters(), strict=True)
    same = all(torch.equal(p.to_local(), q.to_local()) for p, q in pairs)
    return torch.tensor([int(same), int(has_dtensor)])


def main() -> None:
    import torch.distributed as dist

    from lowrank_train.train.parallel import end_process_group

    torch.set_num_threads(1)
    out, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    results = {}
    for case in cases:
        if case == "placements":
            check_placements()
        elif case == "nonfinite":
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, check_nonfinite())
            results[case] = {f"{policy}-rank{r}": v for r, res in enumerate(gathered) for policy, v in res.items()}
        elif case == "layerwise-resume":
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, check_layerwise_resume())
            results[case] = {f"rank{r}": v for r, v in enumerate(gathered)}
        elif case == "layerwise-nonfinite":
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, check_layerwise_nonfinite())
            results[case] = {f"rank{r}": v for r, v in enumerate(gathered)}
        else:
            results[case] = run_case(case)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    end_process_group()  # frees the FSDP / hook cycles that hold the group first


if __name__ == "__main__":
    main()
