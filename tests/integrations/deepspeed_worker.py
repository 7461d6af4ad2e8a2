"""torchrun worker: the MLP of distributed_worker.py trained with GaLore inside a DeepSpeed ZeRO-0 engine.

Run as ``torchrun --standalone --nproc_per_node 2 deepspeed_worker.py OUT.pt CASE [CASE ...]`` with
``DS_ACCELERATOR=cpu``; a case is ``fp32`` or ``autocast`` (DeepSpeed's ``torch_autocast`` in bf16). Rank 0
writes ``{case: {name: tensor}}``.
"""

from __future__ import annotations

import sys

import distributed_worker as common  # the script's folder is on sys.path
import torch

CONFIGS = {
    "fp32": {},
    "autocast": {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
}


def run_case(case: str) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    from lowrank_train.integrations.deepspeed import deepspeed_initialize
    from lowrank_train.optim import GaLore

    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = common.GLOBAL_BATCH // world
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    model = common.build_model("mlp")
    config = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0},
        **CONFIGS[case],
    }
    engine, *_ = deepspeed_initialize(model, common.make_optimizer(model, "svd", GaLore), config)
    for step in common.global_batches("mlp", 1):
        (inputs, targets) = step[0]
        loss = torch.nn.functional.mse_loss(engine(inputs[shard]).float(), targets[shard])
        engine.backward(loss)
        engine.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    from lowrank_train.train.parallel import end_process_group

    torch.set_num_threads(1)
    out, cases = sys.argv[1], sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    results = {case: run_case(case) for case in cases}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    end_process_group()  # frees the FSDP / hook cycles that hold the group first


if __name__ == "__main__":
    main()
