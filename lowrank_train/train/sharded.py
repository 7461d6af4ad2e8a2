"""FSDP2 runs of the training recipe (``run.parallel: fsdp2``): the sharded model, its optimizer, and checkpoints
written with ``torch.distributed.checkpoint`` (DCP) that resume on any number of ranks.

Sharding (:func:`shard_model`): ``fully_shard`` on every decoder block, then on the root (the embeddings, the final
norm and the head, tied or not), as torchtitan does. Every parameter becomes a DTensor split on dim 0.

The optimizer (:func:`build_sharded_optimizer`): the GaLore wrapper as
:class:`~lowrank_train.integrations.fsdp.FSDP2GaLore` (projections of row-sharded gradients), a plain torch
optimizer (AdamW) as it is, since torch's optimizers step DTensors; with ``optimizer.layerwise`` one of them per
parameter inside :func:`~lowrank_train.integrations.fsdp.fsdp2_layerwise` (no DDP wrapper: FSDP2 reduce-scatters
every micro-batch and runs the engine's post-accumulate-grad hooks after it).

A checkpoint (:func:`save_sharded_checkpoint`) is the usual run-folder checkpoint (:mod:`~.checkpoint`: one
atomic rename commits it, ``meta.json`` holds the sha256 of every file, ``latest``, rejected folders) whose
``state.pt`` keeps only what is the same on every rank (counters, data position, losses, schedule, optimizer
hyperparameters) and whose ``shards/`` folder is one DCP checkpoint written by all ranks together::

    checkpoints/step-00000040/shards/.metadata, __0_0.distcp, __1_0.distcp, ...
    checkpoints/step-00000040/state.pt, meta.json      written by rank 0 once every rank's shard is on disk

DCP stores each tensor under a global key with its global shape, so a checkpoint loads on any number of ranks
(DCP reads the pieces each rank needs) and in a single process (plain tensors, :func:`load_sharded_model`). The keys
are those of :func:`optimizer_tensors`: ``model.<name>``, ``optimizer.state.<i>.<key>`` and
``optimizer.base.<i>.<key>`` (``i`` the parameter's index in the param groups), ``rng.rank<r>.<device>``; a
layer-wise engine's inner optimizer of parameter ``j`` under ``optimizer.inner.<j>.state.0.<key>`` and
``optimizer.inner.<j>.base.0.<key>`` (its counters and every param group in ``state.pt``).
Replicated state (GaLore's counters, bases, adaptive-gap history; the projected moments of an m <= n weight,
identical on every rank after their all-reduce) is a plain tensor, which DCP writes once. Sharded state is a
DTensor: the moments of a plain parameter as its parameter is split, and the projected moments of an m > n weight
(r x m_k columns on rank k) as ``Shard(1)`` of their global (r x m) shape. That global layout is exactly what the
single-process optimizer holds, so a single-process checkpoint (``state.pt``) resumes under FSDP2 too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowrank_train.train.checkpoint import CheckpointError, file_sha256, load_state, stage_checkpoint
from lowrank_train.train.config import TrainConfig
from lowrank_train.train.parallel import Ranks

SHARDS_FOLDER = "shards"
SHARDED_FORMAT = "dcp/1"
_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")
_OPTIMIZER_KEY = re.compile(r"^optimizer\.(?:inner\.(\d+)\.)?(state|base)\.(\d+)\.(.+)$")


def shard_model(model: nn.Module) -> nn.Module:
    """Applies ``fully_shard`` to every decoder block, then to the root module; returns ``model`` (sharded in place).

    Raises:
        ValueError: the model has no list of decoder blocks (``model.model.layers`` in transformers' layout).
    """
    from torch.distributed.fsdp import fully_shard

    blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers causal LM (``model.model.layers``, or any ``*.layers`` ModuleList)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    lists = [m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"run.parallel=fsdp2: {type(model).__name__} has no ModuleList of decoder blocks to shard")
    return list(lists[0])


def build_sharded_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over the sharded model's ``groups``: FSDP2GaLore for the GaLore wrapper (its base from
    the registry entry), a preset (APOLLO, Fira) on :class:`FSDP2Backend`, the registered torch optimizer itself
    otherwise; with ``optimizer.layerwise`` one of those per parameter inside
    :func:`~lowrank_train.integrations.fsdp.fsdp2_layerwise` (stepped right after each reduce-scatter)."""
    from lowrank_train.integrations.fsdp import FSDP2Backend, FSDP2GaLore, fsdp2_layerwise
    from lowrank_train.train.setup import optimizer_factory

    method = config.optimizer.method
    if not method.lowrank:
        factory = optimizer_factory(config.optimizer)
    else:

        def build(param_groups: list[dict[str, Any]], **hyperparameters: Any) -> torch.optim.Optimizer:
            if method.any_base:
                return FSDP2GaLore(param_groups, base=method.base, **hyperparameters)
            # The presets (APOLLO, APOLLO-Mini, Fira) fix their own rule options; they take the sharded backend.
            return method.build(param_groups, backend=FSDP2Backend(), **hyperparameters)

        factory = optimizer_factory(config.optimizer, build=build)
    if not config.optimizer.layerwise:
        return factory(groups)
    # As build_optimizer does for one process (optimizer.dense_state_bits is refused under FSDP2).
    return fsdp2_layerwise(
        groups,
        factory,
        accumulation_steps=config.data.grad_accum,
        max_grad_norm=config.optimizer.max_grad_norm or None,
        nonfinite=config.optimizer.nonfinite,
    )


# ----- the layout-free form of model and optimizer state ---------------------------------------------------------
def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _is_layerwise(optimizer: torch.optim.Optimizer) -> bool:
    from lowrank_train.optim.layerwise import LayerwiseOptimizer

    return isinstance(optimizer, LayerwiseOptimizer)


def _moments_section(optimizer: torch.optim.Optimizer) -> str:
    """Where per-parameter state shaped like the parameter lives: GaLore's inner optimizer (``base``) or the
    optimizer's own state (``state``) for a plain torch optimizer."""
    from lowrank_train.optim.galore import GaLore

    return "base" if isinstance(optimizer, GaLore) else "state"


def _is_projected(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    is_lowrank = getattr(optimizer, "is_lowrank", None)
    return bool(is_lowrank and is_lowrank(param))


def _global_layout(
    optimizer: torch.optim.Optimizer, section: str, param: torch.Tensor, shape: tuple[int, ...]
) -> list[Any] | None:
    """The DTensor placements of a state tensor of global ``shape`` of ``param``, or ``None`` for a replicated one
    (:func:`~lowrank_train.integrations.fsdp.state_placements`); only the moments section can be sharded.
    ``optimizer`` is the one holding the state (a layer-wise engine's inner optimizer of ``param``)."""
    from lowrank_train.integrations.fsdp import state_placements

    if section != _moments_section(optimizer):
        return None
    return state_placements(param, shape, projected=_is_projected(optimizer, param))


# (state tensor, the optimizer holding it, its section, its parameter) -> the tensor to store
Placer = Callable[[torch.Tensor, torch.optim.Optimizer, str, torch.Tensor], torch.Tensor]


def _split_state(
    optimizer: torch.optim.Optimizer, native: Mapping[str, Any], place: Placer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``native`` (``optimizer``'s state dict) as ``optimizer.<section>.<i>.<key>`` tensors, each passed through
    ``place``, and the rest (``plain_state``: the non-tensor entries under the same keys). A layer-wise engine's
    inner states become ``optimizer.inner.<j>.<section>.<i>.<key>`` (``j`` the parameter's index in the engine)
    and their rests ``rest["inner"][j]``; its own counters stay in the rest (replicated)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    params = _params(optimizer)
    rest = _split_one(optimizer, native, "optimizer.", params, place, tensors, plain)
    if _is_layerwise(optimizer) and "inner" in native:
        if len(native["inner"]) != len(params):
            raise CheckpointError(
                f"the saved layer-wise optimizer holds {len(native['inner'])} inner optimizers, this one steps "
                f"{len(params)} parameters: not this run's model"
            )
        rest["inner"] = [
            _split_one(optimizer.inner_optimizer(p), saved, f"optimizer.inner.{j}.", [p], place, tensors, plain)
            for j, (p, saved) in enumerate(zip(params, native["inner"], strict=True))
        ]
    rest["plain_state"] = plain
    return tensors, rest


def _split_one(
    owner: torch.optim.Optimizer,
    native: Mapping[str, Any],
    prefix: str,
    params: list[torch.Tensor],
    place: Placer,
    tensors: dict[str, torch.Tensor],
    plain: dict[str, Any],
) -> dict[str, Any]:
    rest: dict[str, Any] = {k: v for k, v in native.items() if k not in ("state", "base", "inner")}
    if "base" in native:
        rest["base"] = {k: v for k, v in native["base"].items() if k != "state"}
    for section, state in _state_sections(native):
        for index, entries in state.items():
            if index >= len(params):
                raise CheckpointError(f"the saved {prefix}{section}.{index} has no parameter {index} here")
            for key, value in entries.items():
                name = f"{prefix}{section}.{index}.{key}"
                if torch.is_tensor(value):
                    tensors[name] = place(value, owner, section, params[index])
                else:
                    plain[name] = value
    return rest


def _state_sections(native: Mapping[str, Any]) -> list[tuple[str, Mapping[int, Mapping[str, Any]]]]:
    sections = [("state", native["state"])]
    if "base" in native:
        sections.append(("base", native["base"]["state"]))
    return sections


def _owner(optimizer: torch.optim.Optimizer, name: str) -> tuple[torch.optim.Optimizer, str, int, str, torch.Tensor]:
    """(the optimizer holding it, section, parameter index there, key, the parameter) of a saved optimizer key."""
    match = _OPTIMIZER_KEY.match(name)
    if match is None:
        raise CheckpointError(f"{name} is not an optimizer state key")
    inner, section, index, key = match.group(1), match.group(2), int(match.group(3)), match.group(4)
    owner, params = optimizer, _params(optimizer)
    if inner is not None:
        if not _is_layerwise(optimizer) or int(inner) >= len(params):
            raise CheckpointError(
                f"the checkpoint's {name} belongs to a layer-wise optimizer's parameter {inner}, which this "
                f"{type(optimizer).__name__} does not have: resume with the optimizer.layerwise the run was saved with"
            )
        owner = optimizer.inner_optimizer(params[int(inner)])
        params = _params(owner)
    if index >= len(params):
        raise CheckpointError(f"the checkpoint's {name} has no parameter {index} in this optimizer")
    return owner, section, index, key, params[index]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` split into layout-free tensors (global shapes; DTensors where sharded) and the
    rest (param groups and other plain values), which :func:`load_optimizer_tensors` puts back together.

    Returns:
        ``({"optimizer.<section>.<i>.<key>": tensor}, rest)``; a layer-wise engine's inner states under
        ``optimizer.inner.<j>.<section>.<i>.<key>``.
    """
    return _split_state(optimizer, optimizer.state_dict(), _local_to_global)


def _local_to_global(
    value: torch.Tensor, owner: torch.optim.Optimizer, section: str, param: torch.Tensor
) -> torch.Tensor:
    """This rank's piece of a state tensor as the global tensor it is part of (a DTensor where it is split)."""
    from torch.distributed.tensor import DTensor

    from lowrank_train.integrations.fsdp import projected_state_shape

    if isinstance(value, DTensor) or not isinstance(param, DTensor):
        return value
    shape = projected_state_shape(value, param) if section == "base" else tuple(value.shape)
    return _to_global(value, _global_layout(owner, section, param, shape), shape, param)


def _to_global(
    local: torch.Tensor, placements: list[Any] | None, shape: tuple[int, ...], param: torch.Tensor
) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if placements is None:
        return local
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def optimizer_template(
    optimizer: torch.optim.Optimizer, entries: Mapping[str, tuple[torch.Size, torch.dtype]]
) -> dict[str, torch.Tensor]:
    """Empty tensors, laid out for this optimizer's parameters, for the saved optimizer keys in ``entries``
    (``{key: (global shape, dtype)}``): what DCP fills on load."""
    from torch.distributed.tensor import empty as dtensor_empty

    template: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in entries.items():
        if _OPTIMIZER_KEY.match(name) is None:
            continue
        owner, section, _, _, param = _owner(optimizer, name)
        placements = _global_layout(owner, section, param, tuple(shape))
        if placements is None:
            # Replicated state is read to the CPU: load_state_dict moves it where the optimizer keeps it.
            template[name] = torch.empty(shape, dtype=dtype)
        else:
            template[name] = dtensor_empty(
                shape,
                dtype=dtype,
                device_mesh=param.device_mesh,
                placements=placements,  # type: ignore[attr-defined]
            )
    return template


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]
) -> None:
    """Loads what :func:`optimizer_tensors` split (tensors laid out by :func:`optimizer_template`) into
    ``optimizer`` through its own ``load_state_dict`` (GaLore's and the layer-wise engine's check the shapes
    first)."""
    from torch.distributed.tensor import DTensor

    # None: the optimizer's own sections; j: the layer-wise engine's inner optimizer of parameter j.
    sections: dict[int | None, dict[str, dict[int, dict[str, Any]]]] = {}
    values = {**dict(rest.get("plain_state", {})), **dict(tensors)}
    for name, value in values.items():
        match = _OPTIMIZER_KEY.match(name)
        if match is None:
            continue
        owner, section, index, key, param = _owner(optimizer, name)
        if isinstance(value, DTensor) and _is_projected(owner, param):
            value = value.to_local()  # the projected moments: this rank's columns, as FSDP2GaLore keeps them
        inner = None if match.group(1) is None else int(match.group(1))
        owned = sections.setdefault(inner, {"state": {}, "base": {}})
        owned[section].setdefault(index, {})[key] = value
    native = _join(rest, sections.get(None))
    if "inner" in rest:
        native["inner"] = [_join(saved, sections.get(j)) for j, saved in enumerate(rest["inner"])]
    optimizer.load_state_dict(native)


def _join(rest: Mapping[str, Any], sections: Mapping[str, dict[int, dict[str, Any]]] | None) -> dict[str, Any]:
    sections = sections or {"state": {}, "base": {}}
    native: dict[str, Any] = {k: v for k, v in rest.items() if k not in ("base", "plain_state", "inner")}
    native["state"] = sections["state"]
    if "base" in rest:
        native["base"] = {**dict(rest["base"]), "state": sections["base"]}
    return native


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under ``model.<name>`` keys (DTensors for a sharded model)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {f"model.{k}": v for k, v in get_model_state_dict(model).items()}


def load_model_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Loads ``model.<name>`` tensors (a filled :func:`model_tensors` template) into ``model``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    set_model_state_dict(model, state)


# ----- RNG, per rank ---------------------------------------------------------------------------------------------
def rng_tensors(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's global RNG states under per-rank keys (each rank's stream is its own)."""
    from lowrank_train.train.run_dir import capture_rng

    return {f"rng.rank{rank}.{kind}": state for kind, state in capture_rng(device).items()}


# ----- save / load -----------------------------------------------------------------------------------------------
def save_sharded_checkpoint(
    output: Path,
    config: TrainConfig,
    mode: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    ranks: Ranks,
    state: dict[str, Any],
    *,
    data_fingerprint: str | None,
) -> Path:
    """Writes a sharded checkpoint with every rank (a collective) and returns its folder, the same on every rank.

    Rank 0 makes the private staging folder; every rank writes its DCP shard into it and hashes its own files;
    once all of them are done rank 0 writes ``state.pt`` (``state``: the replicated rest, see
    :func:`~lowrank_train.train.run_dir.checkpoint_state`) and ``meta.json`` (the world size, every file's
    sha256) and commits with the usual rename (:func:`~lowrank_train.train.checkpoint.save_checkpoint`).

    Raises:
        CheckpointError: a rank could not write (every rank raises; the previous checkpoints are untouched).
    """
    import torch.distributed.checkpoint as dcp

    from lowrank_train.train.run_dir import save_run_checkpoint

    step = int(state["step"])
    staging, error = None, None
    if ranks.is_main:
        try:
            staging = stage_checkpoint(output, step)
        except CheckpointError as caught:
            error = str(caught)
    staging, error = ranks.broadcast((staging, error))
    if error is not None:
        raise CheckpointError(error)
    tensors, rest = optimizer_tensors(optimizer)
    sharded = {**model_tensors(model), **tensors, **rng_tensors(ranks.rank, device)}
    shards = Path(staging) / SHARDS_FOLDER
    try:
        dcp.save(sharded, storage_writer=dcp.FileSystemWriter(shards, sync_files=True, single_file_per_rank=True))
    except Exception as caught:  # DCP re-raises any rank's failure on every rank (a CheckpointException)
        raise CheckpointError(
            f"could not write the shards of checkpoint step {step} into {shards} ({caught}); the previous "
            "checkpoints are intact. Free disk space (or fix the file system) and resume with --resume"
        ) from caught
    # Each rank hashes its own file (in parallel); rank 0 also DCP's .metadata.
    mine = {
        f"{SHARDS_FOLDER}/{p.name}": {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(shards.iterdir())
        if _written_by(p.name, ranks)
    }
    gathered = [mine]
    if ranks.distributed:
        gathered = [{} for _ in range(ranks.world_size)]
        dist.all_gather_object(gathered, mine)
    folder, error = None, None
    if ranks.is_main:
        files = {name: record for part in gathered for name, record in part.items()}
        state = {**state, "optimizer_rest": rest}
        sharding = {"format": SHARDED_FORMAT, "world_size": ranks.world_size, "engine": ranks.engine}
        try:
            folder = save_run_checkpoint(
                output,
                config,
                mode,
                state,
                data_fingerprint=data_fingerprint,
                world_size=ranks.world_size,
                staged=Path(staging),
                extra_files=files,
                extra_meta={"sharded": sharding},
            )
        except CheckpointError as caught:
            error = str(caught)
    folder, error = ranks.broadcast((folder, error))
    if error is not None:
        raise CheckpointError(error)
    return Path(folder)


def _written_by(name: str, ranks: Ranks) -> bool:
    match = _SHARD_FILE.match(name)
    return (match is not None and int(match.group(1)) == ranks.rank) or (ranks.is_main and name == ".metadata")


def is_sharded_checkpoint(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's ``meta.json`` describes a sharded (DCP) checkpoint."""
    return isinstance(meta.get("sharded"), dict)


def saved_entries(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """``{key: (global shape, dtype)}`` of every tensor in a sharded checkpoint's DCP metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(folder / SHARDS_FOLDER).read_metadata()
    return {
        key: (entry.size, entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
    }


def restore_sharded(
    folder: Path,
    meta: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    ranks: Ranks,
) -> dict[str, Any]:
    """Loads a checkpoint into a model and optimizer of any layout (sharded or not, any number of ranks) and
    restores this rank's RNG states; returns the replicated state (``state.pt``) for the resume point.

    A sharded checkpoint is read through DCP, which reshards; a single-process one (``state.pt`` holding the whole
    model and optimizer) is split here, each rank keeping its part.
    """
    from lowrank_train.train.run_dir import restore_rng

    state = load_state(folder, map_location="cpu")
    if not is_sharded_checkpoint(meta):
        _restore_dense(state, model, optimizer)
        restore_rng(state["rng"], device)
        return state
    import torch.distributed.checkpoint as dcp

    entries = saved_entries(folder)
    template: dict[str, torch.Tensor] = {k: v for k, v in model_tensors(model).items() if k in entries}
    missing = sorted(set(model_tensors(model)) - set(entries) - _tied_keys(model))
    if missing:
        raise CheckpointError(f"{folder / SHARDS_FOLDER} lacks model tensors {missing[:5]}: not this run's model")
    template.update(optimizer_template(optimizer, entries))
    saved_ranks = int(meta["sharded"]["world_size"])
    own = ranks.rank if ranks.rank < saved_ranks else 0  # a new rank continues rank 0's stream
    rng_keys = {k: v for k, v in entries.items() if k.startswith(f"rng.rank{own}.")}
    template.update({k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in rng_keys.items()})
    dcp.load(template, storage_reader=dcp.FileSystemReader(folder / SHARDS_FOLDER))
    load_model_tensors(model, template)
    load_optimizer_tensors(optimizer, template, state["optimizer_rest"])
    restore_rng({k.rsplit(".", 1)[1]: v for k, v in template.items() if k in rng_keys}, device)
    return state


def _tied_keys(model: nn.Module) -> set[str]:
    """``model.<name>`` keys of tensors that share storage with an earlier key (tied embeddings): saved once."""
    seen: dict[int, str] = {}
    tied = set()
    for name, value in model.state_dict(keep_vars=True).items():
        identity = id(value)
        if identity in seen:
            tied.add(f"model.{name}")
        seen.setdefault(identity, name)
    return tied


def _restore_dense(state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A single-process checkpoint into a sharded model and optimizer: each rank keeps its slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
    tensors, rest = _split_state(optimizer, state["optimizer"], _global_to_local)
    load_optimizer_tensors(optimizer, tensors, rest)


def _global_to_local(
    full: torch.Tensor, owner: torch.optim.Optimizer, section: str, param: torch.Tensor
) -> torch.Tensor:
    """A whole state tensor (as one process holds it) as the DTensor of this rank's layout where it is split."""
    placements = _global_layout(owner, section, param, tuple(full.shape))
    return full if placements is None else _distribute(full, param, placements)


def _distribute(full: torch.Tensor, param: torch.Tensor, placements: list[Any]) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    mesh = param.device_mesh  # type: ignore[attr-defined]
    # Every rank holds the whole tensor: each keeps its slice, no communication.
    return distribute_tensor(full.to(mesh.device_type), mesh, placements, src_data_rank=None)


def load_sharded_model(folder: Path, model: nn.Module) -> None:
    """Loads the model tensors of a sharded checkpoint into an unsharded ``model`` in this process (no process
    group): DCP assembles each whole tensor from the ranks' shards (``lowrank-train export``)."""
    import torch.distributed.checkpoint as dcp

    entries = saved_entries(folder)
    state = model.state_dict()
    template = {f"model.{k}": v for k, v in state.items() if f"model.{k}" in entries}
    missing = sorted(set(f"model.{k}" for k in state) - set(template) - _tied_keys(model))
    if missing:
        raise CheckpointError(f"{folder / SHARDS_FOLDER} lacks model tensors {missing[:5]}: not this run's model")
    dcp.load(template, storage_reader=dcp.FileSystemReader(folder / SHARDS_FOLDER), no_dist=True)
    model.load_state_dict({k[len("model.") :]: v for k, v in template.items()}, strict=False)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU of rank 0 (empty on the others): a collective every rank calls."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
