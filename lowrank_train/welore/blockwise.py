"""Block-by-block calibration and staged replacements: WeLore at 7B shapes in the memory of one block (issue 14).

Layer-wise compressors (GPTQ, SVD-LLM) never run the whole model on the calibration set with every layer's
statistics alive. They catch the inputs of the first transformer block, then for each block in turn: run it on
those inputs with hooks on its linears, use and free the block's statistics, and keep its outputs as the next
block's inputs. :class:`CalibrationChain` does that.

Blocks need not receive the same keyword arguments: models with local and global attention layers (Gemma 2/3,
Cohere 2, Qwen with ``layer_types``) hand each block the mask and rotary table of its attention type. One forward
per sequence, stopped at the last block's input, catches every block's own call arguments (forward pre-hooks);
equal tensors among them are kept once, so the chain holds one mask and table per attention type and length.
It assumes only that block k's hidden states are block k-1's output; :func:`chain_mismatch` checks this on one
calibration sequence against the model's own forward before anything is computed.

The replacements of finished blocks wait in a :class:`FactorStaging` (CPU memory, or one safetensors file per
block on disk) and are swapped in only after every block succeeded, so a failure half-way leaves the model as it
was without holding every replacement in the model's memory.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lowrank_train.nn.surgery import find_blocks
from lowrank_train.welore.spectrum import InputStatistics, StatisticsAccumulator

__all__ = [
    "STAGING_LOCATIONS",
    "BlockPlan",
    "CalibrationChain",
    "FactorStaging",
    "block_statistics",
    "chain_mismatch",
    "plan_blocks",
]

STAGING_LOCATIONS = ("auto", "memory", "disk")


@dataclass(frozen=True)
class BlockPlan:
    """One transformer block and the linears inside it that are compressed.

    Attributes:
        name: qualified block name (``"model.layers.3"``).
        block: the block module.
        linears: its block linears by qualified name, in module order (may be empty).
    """

    name: str
    block: nn.Module
    linears: dict[str, nn.Linear]


def plan_blocks(model: nn.Module, linears: Mapping[str, nn.Linear]) -> list[BlockPlan]:
    """Every repeated block of ``model`` in order (:func:`lowrank_train.nn.surgery.find_blocks`) with its linears.

    Raises:
        ValueError: if a linear lies outside every block.
    """
    blocks = find_blocks(model)
    owned: dict[str, dict[str, nn.Linear]] = {name: {} for name in blocks}
    for linear_name, linear in linears.items():
        owner = next((b for b in blocks if linear_name.startswith(f"{b}.")), None)
        if owner is None:
            raise ValueError(f"linear {linear_name!r} lies outside the model's blocks {list(blocks)[:3]}...")
        owned[owner][linear_name] = linear
    return [BlockPlan(name, block, owned[name]) for name, block in blocks.items()]


class _StopForward(Exception):
    """Raised by the last block's pre-hook: everything after it is not needed."""


def _call_options(model: nn.Module) -> dict[str, bool]:
    # A key/value cache would be filled by every block call and read by the next call of the same block (pass 2
    # would attend to pass 1's keys): switch it off where the model has the switch.
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def _hidden_slot(args: tuple, kwargs: dict, index: int) -> int | str:
    if args and isinstance(args[0], Tensor):
        return 0
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "hidden_states"
    raise ValueError(f"cannot find the hidden states among block {index}'s arguments (positional 0 or hidden_states)")


def _block_output(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]  # older transformers blocks return (hidden_states, ...)
    raise ValueError(f"a block returned {type(output).__name__}; expected a tensor or a tuple starting with one")


class _TensorPool:
    """Keeps one copy of equal tensors (masks, rotary tables) over all blocks and calibration sequences."""

    def __init__(self) -> None:
        self._kept: dict[tuple, list[Tensor]] = {}

    def share(self, value: object) -> object:
        """``value`` with every tensor inside it (tuples, lists, dicts) replaced by an equal one already kept."""
        if isinstance(value, Tensor):
            kept = self._kept.setdefault((tuple(value.shape), value.dtype, value.device), [])
            for other in kept:
                if other is value or torch.equal(other, value):
                    return other
            kept.append(value)
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(self.share(item) for item in value))
        if isinstance(value, tuple | list):
            return type(value)(self.share(item) for item in value)
        if isinstance(value, dict):
            return {key: self.share(item) for key, item in value.items()}
        return value


@dataclass
class _BlockCall:
    """One block's call on one calibration sequence, without the hidden states: positional and keyword arguments."""

    args: tuple
    kwargs: dict
    slot: int | str

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        if self.slot == 0:
            return _block_output(block(hidden, *self.args[1:], **self.kwargs))
        return _block_output(block(*self.args, **{**self.kwargs, self.slot: hidden}))


def _capture_calls(
    model: nn.Module, blocks: Sequence[nn.Module], input_ids: Tensor, pool: _TensorPool, sample: bool = False
) -> tuple[Tensor, list[_BlockCall], list[Tensor]]:
    # One forward of the model, stopped at the last block's input: block 0's hidden states, every block's own
    # call arguments (the hidden states left out; per-layer masks and rotary tables kept once through the pool),
    # and with ``sample`` a sample of every block's input hidden states.
    calls: dict[int, _BlockCall] = {}
    first: list[Tensor] = []
    samples: dict[int, Tensor] = {}

    def make_hook(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index in calls:
                return
            slot = _hidden_slot(args, kwargs, index)
            hidden = args[0] if slot == 0 else kwargs[slot]
            if index == 0:
                first.append(hidden)
            if sample:
                samples[index] = _sample(hidden)
            rest = (None, *args[1:]) if slot == 0 else args
            kept = {key: value for key, value in kwargs.items() if key != slot}
            calls[index] = _BlockCall(pool.share(rest), pool.share(kept), slot)
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        model(input_ids, **_call_options(model))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(blocks)) if i not in calls]
    if missing:
        raise ValueError(f"the model's forward never called block {missing[0]}")
    return first[0], [calls[i] for i in range(len(blocks))], [samples[i] for i in sorted(samples)]


class CalibrationChain:
    """The calibration sequences at the input of the next block, pushed through the blocks one at a time.

    Holds one ``(1, seq_len, hidden)`` activation per sequence (in the model's dtype, on its device) plus each
    block's own call arguments per sequence, caught in one forward of the model: blocks that receive different
    masks or rotary tables (sliding-window and full-attention layers) get their own. Equal tensors are kept once;
    the arguments of a finished block are dropped.

    Args:
        model: the model, in eval mode, called as ``model(input_ids)``.
        blocks: its blocks, in order.
        calibration: ``(1, seq_len)`` token-id tensors on the model's device.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], calibration: Sequence[Tensor]) -> None:
        pool = _TensorPool()
        self._blocks = list(blocks)
        self._next = 0
        self._hidden: list[Tensor] = []
        self._calls: list[list[_BlockCall | None]] = []
        for ids in calibration:
            hidden, calls, _ = _capture_calls(model, self._blocks, ids, pool)
            self._hidden.append(hidden)
            self._calls.append(list(calls))

    def run(self, block: nn.Module, linears: Mapping[str, nn.Linear] | None = None) -> dict[str, InputStatistics]:
        """Runs ``block`` on every sequence, measuring the inputs of ``linears``; its outputs become the inputs.

        Args:
            block: the next block of the chain.
            linears: layers inside ``block`` to measure (none: only advance).

        Returns:
            Statistics per name in ``linears`` (empty when nothing was measured).

        Raises:
            ValueError: if ``block`` is not the chain's next block.
        """
        index = self._next
        if index >= len(self._blocks) or block is not self._blocks[index]:
            raise ValueError(f"the chain's next block is block {index}; it was given another module")
        self._next += 1
        if not linears:
            self._advance(index, block)
            return {}
        with StatisticsAccumulator(linears) as accumulator:
            self._advance(index, block, accumulator)
            return accumulator.statistics()

    def _advance(self, index: int, block: nn.Module, accumulator: StatisticsAccumulator | None = None) -> None:
        for sequence, calls in enumerate(self._calls):
            if accumulator is not None:
                accumulator.start_pass()
            self._hidden[sequence] = calls[index].run(block, self._hidden[sequence])
            calls[index] = None  # its masks and tables are freed once no later block shares them


def _sample(hidden: Tensor, size: int = 4096) -> Tensor:
    flat = hidden.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // size)].float().cpu()


def chain_mismatch(model: nn.Module, blocks: Sequence[nn.Module], input_ids: Tensor) -> str | None:
    """Whether running ``blocks`` one after another reproduces the model's own forward on ``input_ids``.

    Catches every block's input and call arguments during one forward, then pushes block 0's input through the
    blocks in turn, each with its own arguments, and compares with the inputs the forward gave them.

    Args:
        model: the model, in eval mode.
        blocks: its blocks in order.
        input_ids: one ``(1, seq_len)`` calibration sequence (the longest is the strictest).

    Returns:
        ``None`` when the chain is exact, else why not.
    """
    try:
        hidden, calls, samples = _capture_calls(model, blocks, input_ids, _TensorPool(), sample=True)
    except ValueError as error:
        return str(error)
    for index, block in enumerate(blocks[:-1]):
        hidden = calls[index].run(block, hidden)
        expected, got = samples[index + 1], _sample(hidden)
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * scale + 1e-30):
            return f"the input of block {index + 1} is not block {index}'s output"
    return None


def block_statistics(
    model: nn.Module,
    plan: Sequence[BlockPlan],
    calibration: Sequence[Tensor] | Mapping[str, InputStatistics] | None,
    measure: Mapping[str, bool] | None = None,
) -> Iterator[tuple[BlockPlan, dict[str, InputStatistics] | None]]:
    """Each block of ``plan`` with the input statistics of its (measured) linears, one block at a time.

    Args:
        model: the model, in eval mode.
        plan: :func:`plan_blocks`.
        calibration: token-id sequences on the model's device (statistics come from a :class:`CalibrationChain`,
            the blocks after the last measured one are not run), precomputed statistics by linear name (handed
            out block by block), or ``None`` for data-free use (no statistics).
        measure: which linears need statistics (default: all).

    Yields:
        ``(block, statistics)``; ``statistics`` is ``None`` without calibration data, else a dict by name of the
        block's measured linears. The generator keeps no reference to it: once the caller drops it, it is freed
        (iterate with a plain ``for`` loop: ``enumerate``'s reused result tuple would keep it alive).
    """
    wanted = [{n: lin for n, lin in entry.linears.items() if measure is None or measure[n]} for entry in plan]
    if calibration is None:
        for entry in plan:
            yield entry, None
        return
    if isinstance(calibration, Mapping):
        for entry, linears in zip(plan, wanted, strict=True):
            yield entry, {name: calibration[name] for name in linears}
        return
    last = max((i for i, linears in enumerate(wanted) if linears), default=-1)
    if last < 0:
        for entry in plan:
            yield entry, {}
        return
    # The statistics are yielded straight from the call, never bound to a local name: a suspended generator keeps
    # its locals alive, which would hold a block's statistics while the caller is already done with them.
    chain = [CalibrationChain(model, [entry.block for entry in plan], calibration)]
    for index, (entry, linears) in enumerate(zip(plan, wanted, strict=True)):
        if not chain:
            yield entry, {}
        elif index == last:
            yield entry, chain.pop().run(entry.block, linears)  # no later block is measured: drop the activations
        else:
            yield entry, chain[0].run(entry.block, linears)


class FactorStaging:
    """Replacement tensors of finished blocks, held off the model until every block has succeeded.

    ``"memory"`` keeps them as CPU tensors (for a model on an accelerator: its memory is not touched);
    ``"disk"`` writes one safetensors file per block into a temporary folder (for a model on the CPU, where
    staging in memory would hold every replacement next to the model). Use as a context manager: the folder is
    removed on exit.

    Args:
        location: ``"memory"`` or ``"disk"``.
        directory: where the temporary folder is made (``None``: the system's temporary directory).
    """

    def __init__(self, location: str, directory: str | os.PathLike | None = None) -> None:
        if location not in ("memory", "disk"):
            raise ValueError(f"staging location must be 'memory' or 'disk', got {location!r}")
        self.location = location
        self._directory = directory
        self._folder: tempfile.TemporaryDirectory | None = None
        self._memory: dict[str, dict[str, Tensor]] = {}
        self._files: dict[str, str] = {}
        self._expected: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}

    def __enter__(self) -> FactorStaging:
        if self.location == "disk":
            if self._directory is not None:
                os.makedirs(self._directory, exist_ok=True)
            self._folder = tempfile.TemporaryDirectory(prefix="welore-staging-", dir=self._directory)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._memory.clear()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def keys(self) -> list[str]:
        """Staged block keys, in the order they were put."""
        return list(self._expected)

    def put(self, key: str, tensors: Mapping[str, Tensor]) -> None:
        """Stages ``tensors`` (moved to the CPU) under ``key``."""
        cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
        self._expected[key] = {name: (tuple(t.shape), t.dtype) for name, t in cpu.items()}
        if self.location == "memory":
            self._memory[key] = cpu
            return
        if self._folder is None:
            raise RuntimeError("FactorStaging('disk') is used outside its with-block")
        path = os.path.join(self._folder.name, f"{len(self._files):05d}.safetensors")
        if cpu:
            save_file(cpu, path)
        self._files[key] = path

    def check(self) -> None:
        """Checks that every staged file is there with the tensors it was given (before anything is swapped).

        Raises:
            ValueError: naming the file and what is wrong with it.
        """
        for key, path in self._files.items():
            expected = self._expected[key]
            if not expected:
                continue
            with safe_open(path, framework="pt") as handle:
                found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            wrong = {name for name, (shape, _) in expected.items() if found.get(name) != shape}
            if wrong or set(found) != set(expected):
                raise ValueError(f"staged factors in {path} do not match what was written (e.g. {sorted(wrong)[:1]})")

    def take(self, key: str, device: torch.device | str) -> dict[str, Tensor]:
        """The tensors staged under ``key``, on ``device``; their staged copy is released."""
        if self.location == "memory":
            return {name: tensor.to(device) for name, tensor in self._memory.pop(key).items()}
        path = self._files.pop(key)
        if not self._expected[key]:
            return {}
        tensors = load_file(path, device=str(device))
        os.remove(path)
        return tensors
