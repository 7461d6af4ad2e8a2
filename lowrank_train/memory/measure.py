"""Measured memory, what the estimator is checked against: live storages of a model and its optimizer, the tensors
autograd saves for backward, and the peak of new allocations inside a block."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_BASIS_KEYS = ("basis", "basis_codes", "basis_scales")


def _storage_key(tensor: Tensor) -> tuple[str, int]:
    return (tensor.device.type, tensor.untyped_storage().data_ptr())


def _iter_tensors(obj: Any, key: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor) and type(obj) is not Tensor and hasattr(obj, "__tensor_flatten__"):
        # Wrapper subclasses (torchao's 4-bit optimizer states) own no storage: count their inner tensors.
        names, _ = obj.__tensor_flatten__()
        for name in names:
            yield from _iter_tensors(getattr(obj, name), key)
    elif isinstance(obj, Tensor):
        yield key, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _iter_tensors(v, str(k))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v, key)


def measure_live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of the distinct storages held by a model and its optimizer, by component.

    Storages are counted once (tied weights, views and shared code maps included); keys follow
    :class:`MemoryEstimate`: ``weights`` (parameters and buffers), ``gradients``, ``optimizer_states`` and
    ``projection_bases`` (GaLore's ``basis``/``basis_codes``/``basis_scales`` state).

    Args:
        model: the trained module.
        optimizer: its optimizer; its ``state_dict()`` is walked (GaLore's includes the base optimizer's).
    """
    seen: set[tuple[str, int]] = set()
    totals = {"weights": 0, "gradients": 0, "optimizer_states": 0, "projection_bases": 0}

    def add(component: str, tensor: Tensor) -> None:
        if hasattr(tensor, "to_local"):  # a DTensor (FSDP2 parameter or gradient): this rank's shard
            tensor = tensor.to_local()
        if tensor.device.type == "meta":
            return
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            totals[component] += tensor.untyped_storage().nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        add("weights", tensor)
    for param in model.parameters():
        if param.grad is not None:
            add("gradients", param.grad)
    if optimizer is not None:
        for key, tensor in _iter_tensors(optimizer.state_dict()):
            add("projection_bases" if key in _BASIS_KEYS else "optimizer_states", tensor)
    return totals


class SavedTensorBytes:
    """Counts the distinct storages autograd saves for backward inside the ``with`` block.

    Parameters (and views of them, such as the ``weight.t()`` a linear layer saves) are not activations and are
    left out, as is anything sharing storage with ``exclude`` (e.g. ``model.buffers()``: INT8 codes).

    Args:
        exclude: tensors whose storages are not counted.

    Example:
        >>> with SavedTensorBytes(exclude=model.buffers()) as saved:
        ...     hidden = model.model(input_ids).last_hidden_state
        >>> saved.bytes
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.bytes = 0
        self._seen: set[tuple[str, int]] = {_storage_key(t) for t in exclude}
        self._hooks: Any = None

    def _pack(self, tensor: Tensor) -> Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if not (isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)):
            key = _storage_key(tensor)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class PeakTensorBytes(TorchDispatchMode):
    """Tracks bytes of tensors allocated inside the block that are still alive, and their peak.

    Only storages created by operators run inside the block count (not the tensors that existed before), so
    ``peak`` is the high-water mark of *new* memory, e.g. the transient cost of a loss or of building a model.
    Views and in-place results share their input's storage and are not counted again.

    Args:
        device: device type whose allocations are tracked.
    """

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._live_keys: set[tuple[str, int]] = set()

    def _release(self, key: tuple[str, int], nbytes: int) -> None:
        if key in self._live_keys:
            self._live_keys.discard(key)
            self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor) or tensor.device.type != self.device:
                continue
            storage = tensor.untyped_storage()
            key = _storage_key(tensor)
            if key in inputs or key in self._live_keys or storage.nbytes() == 0:
                continue
            self._live_keys.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def measure_peak(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, int]:
    """Runs ``fn`` and returns (its result, peak bytes of tensors it allocated; see :class:`PeakTensorBytes`)."""
    with PeakTensorBytes(device) as tracker:
        result = fn()
    return result, tracker.peak
