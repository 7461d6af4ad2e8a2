"""Glue to existing training stacks: Hugging Face Trainer and accelerate, FSDP2, DeepSpeed, PEFT.

Each submodule imports its framework only when used:

* :mod:`lowrank_train.integrations.transformers`: ``LowRankTrainer``, ``LowRankOptimizerConfig``,
  ``create_lowrank_optimizer_and_scheduler`` for ``Trainer(optimizers=...)``.
* :mod:`lowrank_train.integrations.trainer_config`: ``LowRankOptimizerConfig`` and
  ``lowrank_config_from_training_args`` (transformers' ``optim="galore_*"`` settings), re-exported by the above.
* :mod:`lowrank_train.integrations.fsdp`: ``FSDP2GaLore``, GaLore (and APOLLO, Fira) on ``fully_shard`` (DTensor)
  parameters; ``fsdp2_layerwise``, layer-wise steps inside FSDP2's reduce-scatter hooks.
* :mod:`lowrank_train.integrations.deepspeed`: ``deepspeed_initialize``, the ZeRO configurations that can
  carry a GaLore optimizer, and a clear error for the others.
* :mod:`lowrank_train.integrations.peft`: ``peft_param_groups``, which keeps LoRA adapters out of projection.

accelerate needs no glue: ``Accelerator.prepare(model, optimizer)`` takes our optimizers as they are.
"""
