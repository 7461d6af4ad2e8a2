"""Block-by-block calibration and staged replacements: WeLore at 7B shapes in the memory of one block (issue 14).

Layer-wise compressors (GPTQ, SVD-LLM) never run the whole model on the calibration set with every layer's
statistics alive. They catch the inputs of the first transformer block (a forward pre-hook that stops the forward
with an exception), then for each block in turn: run it on those inputs with hooks on its linears, use and free
the block's statistics, and keep its outputs as the next block's inputs. :class:`CalibrationChain` does that.

It assumes the model passes one block's output straight to the next, with the same keyword arguments (attention
mask, position embeddings) for every block, as LLaMA, Mistral, Qwen and GPT-2 do. :func:`chain_mismatch` checks
this on one calibration sequence against the model's own forward before anything is computed.

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
    """Raised by the first block's pre-hook: everything after it is not needed."""


def _call_options(model: nn.Module) -> dict[str, bool]:
    # A key/value cache would be filled by every block call and read by the next call of the same block (pass 2
    # would attend to pass 1's keys): switch it off where the model has the switch.
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def _hidden_slot(args: tuple, kwargs: dict) -> int | str:
    if args and isinstance(args[0], Tensor):
        return 0
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return "hidden_states"
    raise ValueError("cannot find the hidden states among the first block's arguments (positional 0 or hidden_states)")


def _block_output(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]  # older transformers blocks return (hidden_states, ...)
    raise ValueError(f"a block returned {type(output).__name__}; expected a tensor or a tuple starting with one")


@dataclass
class _BlockCall:
    """One calibration sequence at a block boundary: the block's positional and keyword arguments."""

    args: tuple
    kwargs: dict
    slot: int | str

    @property
    def hidden(self) -> Tensor:
        return self.args[0] if self.slot == 0 else self.kwargs[self.slot]

    def with_hidden(self, hidden: Tensor) -> None:
        if self.slot == 0:
            self.args = (hidden, *self.args[1:])
        else:
            self.kwargs = {**self.kwargs, self.slot: hidden}

    def run(self, block: nn.Module) -> Tensor:
        return _block_output(block(*self.args, **self.kwargs))


def _capture_first_block(model: nn.Module, first: nn.Module, input_ids: Tensor) -> _BlockCall:
    captured: list[_BlockCall] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(_BlockCall(tuple(args), dict(kwargs), _hidden_slot(args, kwargs)))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids, **_call_options(model))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError("the model's forward finished without calling its first block")
    return captured[0]


class CalibrationChain:
    """The calibration sequences at the input of the next block, pushed through the blocks one at a time.

    Holds one ``(1, seq_len, hidden)`` activation per sequence (in the model's dtype, on its device) plus each
    sequence's block keyword arguments; nothing of a finished block stays alive.

    Args:
        model: the model, in eval mode, called as ``model(input_ids)``.
        first_block: its first block.
        calibration: ``(1, seq_len)`` token-id tensors on the model's device.
    """

    def __init__(self, model: nn.Module, first_block: nn.Module, calibration: Sequence[Tensor]) -> None:
        self._calls = [_capture_first_block(model, first_block, ids) for ids in calibration]

    def run(self, block: nn.Module, linears: Mapping[str, nn.Linear] | None = None) -> dict[str, InputStatistics]:
        """Runs ``block`` on every sequence, measuring the inputs of ``linears``; its outputs become the inputs.

        Args:
            block: the block whose inputs the chain holds.
            linears: layers inside ``block`` to measure (none: only advance).

        Returns:
            Statistics per name in ``linears`` (empty when nothing was measured).
        """
        if not linears:
            for call in self._calls:
                call.with_hidden(call.run(block))
            return {}
        with StatisticsAccumulator(linears) as accumulator:
            for call in self._calls:
                accumulator.start_pass()
                call.with_hidden(call.run(block))
            return accumulator.statistics()


def _sample(hidden: Tensor, size: int = 4096) -> Tensor:
    flat = hidden.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // size)].float().cpu()


def chain_mismatch(model: nn.Module, blocks: Sequence[nn.Module], input_ids: Tensor) -> str | None:
    """Whether running ``blocks`` one after another reproduces the model's own forward on ``input_ids``.

    Records a sample of every block's input during one ordinary forward, then pushes the first block's input
    through the blocks in turn and compares.

    Args:
        model: the model, in eval mode.
        blocks: its blocks in order.
        input_ids: one ``(1, seq_len)`` calibration sequence (the longest is the strictest).

    Returns:
        ``None`` when the chain is exact, else why not.
    """
    samples: dict[int, Tensor] = {}

    def make_hook(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index not in samples:
                slot = _hidden_slot(args, kwargs)
                samples[index] = _sample(args[0] if slot == 0 else kwargs[slot])

        return hook

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        model(input_ids, **_call_options(model))
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(blocks)) if i not in samples]
    if missing:
        return f"the model's forward never called block {missing[0]}"
    call = _capture_first_block(model, blocks[0], input_ids)
    for index, block in enumerate(blocks[:-1]):
        call.with_hidden(call.run(block))
        expected, got = samples[index + 1], _sample(call.hidden)
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
    chain = [CalibrationChain(model, plan[0].block, calibration)]
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
