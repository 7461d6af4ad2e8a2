"""INT8 (or INT4) weight linear layer trained with stochastic-rounding write-back (Q-GaLore, issue 3 part 4).

The weight lives only as integer codes + fp32 group scales in two buffers of :class:`QuantLinear`. The forward
dequantizes on the fly in the input's dtype (the autocast dtype under autocast, as nn.Linear computes); the backward
returns the weight gradient in the parameter's precision.

How the optimizer gets that gradient: optimizers only see Parameters and their ``.grad``. :class:`QuantLinear`
therefore registers a :class:`QuantizedWeight` as ``weight``: a Parameter subclass of shape ``(out, in)`` whose
storage is a single element expanded with stride 0 (4 bytes, not ``out * in``). The custom autograd function
returns the weight gradient for it, so ``weight.grad`` is an ordinary dense ``(out, in)`` tensor. We chose this
over a torchao-style wrapper tensor subclass because it needs no ``__torch_dispatch__`` table, autograd
accumulates into it unchanged, and the codes stay plain module buffers that ``state_dict`` and ``.to()`` see.
The carrier declares fields pointing at its module's codes/scales buffers; :class:`QuantLinear` re-binds them
after ``.to()`` / ``load_state_dict`` / deepcopy and on every forward, so the link never goes stale.

The optimizer writes the update with :func:`apply_quantized_update`, which stores the result of
:func:`lowrank_train.quant.writeback.requantize_update` (dequantize, decay, add, re-quantize with stochastic
rounding). A plain torch optimizer that tries ``param.add_(...)`` gets a clear ``RuntimeError``
instead of silently writing into the one-element carrier.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_train.nn.autocast import autocast_disabled, autocast_dtype
from lowrank_train.nn.surgery import (
    TargetModules,
    find_target_modules,
    is_dense_linear,
    register_linear_type,
    replace_module,
)
from lowrank_train.quant import QuantizedTensor
from lowrank_train.quant.bits import WEIGHT_BITS, check_bits
from lowrank_train.quant.writeback import requantize_update

# In-place methods that a carrier may still run (they do not touch its values).
_ALLOWED_INPLACE = frozenset({"requires_grad_", "retain_grad", "share_memory_"})
_INPLACE_DUNDERS = frozenset(
    {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ipow__", "__setitem__", "__set__"}
)


def _is_inplace(name: str) -> bool:
    if name in _ALLOWED_INPLACE:
        return False
    if name in _INPLACE_DUNDERS:
        return name != "__set__"  # `param.data = ...` is how QuantLinear moves the carrier between devices
    return name.endswith("_") and not name.startswith("__")


def _mentions_carrier(args: Iterable[Any]) -> bool:
    for arg in args:
        if isinstance(arg, QuantizedWeight):
            return True
        if isinstance(arg, (list, tuple)) and any(isinstance(a, QuantizedWeight) for a in arg):
            return True
    return False


class QuantizedWeight(nn.Parameter):
    """Parameter-shaped carrier of a :class:`QuantLinear` weight's gradient; holds no weight values.

    Its storage is one element expanded to ``(out_features, in_features)``; ``.grad`` is the dense high-precision
    weight gradient. The fields point at the owning module's buffers (re-bound by the module, see module doc).

    Attributes:
        codes: the module's ``weight_codes`` buffer.
        scales: the module's ``weight_scales`` buffer (fp32).
        bits: 8 or 4.
        group_size: elements per quantization group.
    """

    codes: Tensor
    scales: Tensor
    bits: int
    group_size: int

    def __new__(
        cls, codes: Tensor, scales: Tensor, shape: tuple[int, int], bits: int, group_size: int, dtype: torch.dtype
    ) -> QuantizedWeight:
        seed = torch.zeros(1, dtype=dtype, device=codes.device).expand(*shape)
        carrier = torch.Tensor._make_subclass(cls, seed, True)
        carrier.codes, carrier.scales, carrier.bits, carrier.group_size = codes, scales, bits, group_size
        return carrier

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # fields are set in __new__
        pass

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _is_inplace(name) and _mentions_carrier(args):
            raise RuntimeError(
                f"in-place `{name}` on a quantized weight (QuantizedWeight) is not allowed: its values live in INT "
                "codes + scales, not in the parameter. Write updates with "
                "lowrank_train.nn.apply_quantized_update(param, update, generator=...) (the lowrank_train "
                "optimizers do this), or call lowrank_train.nn.dequantize_model(model) to train in float."
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def quantized(self) -> QuantizedTensor:
        """Returns the bound codes/scales as a :class:`QuantizedTensor` view (no copy)."""
        return QuantizedTensor(self.codes, self.scales, tuple(self.shape), self.bits, self.group_size)

    def __deepcopy__(self, memo: dict) -> QuantizedWeight:
        if id(self) in memo:
            return memo[id(self)]
        import copy

        # Deep-copying the fields through `memo` makes the copy point at the copied module's buffers.
        result = QuantizedWeight(
            copy.deepcopy(self.codes, memo),
            copy.deepcopy(self.scales, memo),
            tuple(self.shape),
            self.bits,
            self.group_size,
            self.dtype,
        )
        result.requires_grad_(self.requires_grad)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto: Any) -> Any:
        return (
            _rebuild_quantized_weight,
            (self.codes, self.scales, tuple(self.shape), self.bits, self.group_size, self.dtype, self.requires_grad),
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(shape={tuple(self.shape)}, bits={self.bits}, group_size={self.group_size}, "
            f"grad_dtype={self.dtype}, device={self.device})"
        )


def _rebuild_quantized_weight(
    codes: Tensor,
    scales: Tensor,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    requires_grad: bool,
) -> QuantizedWeight:
    carrier = QuantizedWeight(codes, scales, shape, bits, group_size, dtype)
    carrier.requires_grad_(requires_grad)
    return carrier


def is_quantized_weight(param: Tensor) -> bool:
    """True when ``param`` is the gradient carrier of a quantized linear weight."""
    return isinstance(param, QuantizedWeight)


class _QuantLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized from codes in forward and again in backward (never kept).

    Dtypes (see :mod:`lowrank_train.nn.autocast`): the matmuls run in the compute dtype, which is the autocast
    dtype when autocast is on for ``x``'s device and ``x``'s dtype otherwise; ``x`` is saved in that dtype, as
    ``nn.Linear`` under autocast saves its cast input. ``grad_x`` is returned in ``x``'s dtype, the bias gradient
    in the bias's dtype and the weight gradient in the carrier's dtype (the parameter's high precision).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        carrier: Tensor,
        bias: Tensor | None,
        codes: Tensor,
        scales: Tensor,
        bits: int,
        group_size: int,
    ) -> Tensor:
        compute = autocast_dtype(x) or x.dtype
        with autocast_disabled(x):
            x_compute = x.to(compute)
            weight = QuantizedTensor(codes, scales, tuple(carrier.shape), bits, group_size).dequantize(compute)
            out = F.linear(x_compute, weight, None if bias is None else bias.to(compute))
        ctx.save_for_backward(x_compute, codes, scales)
        ctx.meta = (
            tuple(carrier.shape),
            bits,
            group_size,
            carrier.dtype,
            x.dtype,
            None if bias is None else bias.dtype,
        )
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, codes, scales = ctx.saved_tensors
        shape, bits, group_size, grad_dtype, x_dtype, bias_dtype = ctx.meta
        grad_x = grad_w = grad_b = None
        with autocast_disabled(x):
            grad = grad_out.to(x.dtype)  # x was saved in the compute dtype
            if ctx.needs_input_grad[0]:
                weight = QuantizedTensor(codes, scales, shape, bits, group_size).dequantize(x.dtype)
                grad_x = (grad @ weight).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (grad.reshape(-1, shape[0]).mT @ x.reshape(-1, shape[1])).to(grad_dtype)
            if bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_b = grad.reshape(-1, shape[0]).sum(dim=0).to(bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class QuantLinear(nn.Module):
    """Linear layer whose weight is group-wise quantized INT8 (or INT4) codes + fp32 scales.

    Buffers:
        weight_codes: ``int8`` ``(num_groups * group_size,)`` for 8 bits, packed ``uint8`` half that for 4 bits.
        weight_scales: ``float32`` ``(num_groups,)``; kept fp32 across ``module.to(dtype)`` because rounding a
            group scale would shift every weight of the group by the same amount (a bias SR cannot undo).

    Parameters:
        weight: :class:`QuantizedWeight` carrier of the ``(out_features, in_features)`` gradient.
        bias: an ordinary float Parameter, or ``None``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        group_size: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Start from nn.Linear's init so a freshly built QuantLinear trains like nn.Linear.
        init = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(init, a=5**0.5)
        self._set_quantized(QuantizedTensor.from_float(init, bits, group_size), dtype or torch.get_default_dtype())
        if bias:
            bound = 1 / in_features**0.5 if in_features > 0 else 0.0
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _set_quantized(self, quantized: QuantizedTensor, grad_dtype: torch.dtype) -> None:
        self.bits = quantized.bits
        self.group_size = quantized.group_size
        self.register_buffer("weight_codes", quantized.codes)
        self.register_buffer("weight_scales", quantized.scales)
        self.weight = QuantizedWeight(
            quantized.codes, quantized.scales, quantized.shape, quantized.bits, quantized.group_size, grad_dtype
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 256) -> QuantLinear:
        """Quantizes ``linear.weight`` (round to nearest) into a new module; shares ``linear.bias``."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        module._set_quantized(QuantizedTensor.from_float(weight, bits, group_size), weight.dtype)
        module.bias = linear.bias
        return module

    def quantized(self) -> QuantizedTensor:
        """The weight as a :class:`QuantizedTensor` view of the buffers."""
        return QuantizedTensor(
            self.weight_codes, self.weight_scales, (self.out_features, self.in_features), self.bits, self.group_size
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Materializes the float weight ``(out_features, in_features)`` (export / tests)."""
        return self.quantized().dequantize(dtype or self.weight.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """Returns a plain ``nn.Linear`` with the dequantized weight (the bias Parameter is shared)."""
        weight = self.dequantized_weight(dtype)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def _bind(self) -> None:
        carrier = self._parameters["weight"]
        if carrier.codes is not self.weight_codes or carrier.scales is not self.weight_scales:
            carrier.codes, carrier.scales = self.weight_codes, self.weight_scales

    def forward(self, x: Tensor) -> Tensor:
        self._bind()
        return _QuantLinearFunction.apply(
            x, self.weight, self.bias, self.weight_codes, self.weight_scales, self.bits, self.group_size
        )

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # nn.Module._apply would run `fn` on the expanded carrier (materializing out*in elements on a device
        # move) and on the fp32 scales (rounding them under `.half()`). Hide both, then move them by hand.
        carrier, scales = self._parameters["weight"], self._buffers["weight_scales"]
        self._parameters["weight"], self._buffers["weight_scales"] = None, None
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"], self._buffers["weight_scales"] = carrier, scales
        with torch.no_grad():
            seed = fn(carrier.detach()[:1, :1].contiguous())
        self._buffers["weight_scales"] = scales.to(device=seed.device)
        grad = carrier.grad
        if grad is not None:
            carrier.grad = None
        carrier.data = seed.reshape(1).expand(self.out_features, self.in_features)
        if grad is not None:
            with torch.no_grad():
                carrier.grad = fn(grad)
        self._bind()
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # The carrier holds no values: the weight is saved as weight_codes + weight_scales.
        carrier = self._parameters["weight"]
        self._parameters["weight"] = None
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["weight"] = carrier

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        carrier = self._parameters["weight"]
        self._parameters["weight"] = None
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            self._parameters["weight"] = carrier
        self._bind()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


# The carrier is a 2-D `weight`: lowrank_param_groups and "all-linear" treat QuantLinear as a linear layer.
register_linear_type(QuantLinear)


@torch.no_grad()
def apply_quantized_update(
    param: Tensor,
    update: Tensor,
    *,
    weight_decay_factor: float = 1.0,
    generator: torch.Generator | None = None,
    stochastic: bool = True,
) -> None:
    """Writes ``W <- W * weight_decay_factor + update`` into a quantized weight's codes and scales.

    The math is :func:`lowrank_train.quant.writeback.requantize_update` (fp32, fresh group scales, stochastic
    rounding: ``E[W_new] = W * factor + update``, Q-GaLore Sec. 3.3); this checks the arguments and writes the new
    codes and scales into the module's buffers. ``stochastic=False`` rounds to nearest (the paper's ablation).

    Args:
        param: a :class:`QuantizedWeight` (see :func:`is_quantized_weight`), shape ``(m, n)``.
        update: ``(m, n)`` update in any float dtype, already scaled by the learning rate.
        weight_decay_factor: multiplier of the old weight, e.g. ``1 - lr * weight_decay``.
        generator: randomness for stochastic rounding, on ``param``'s device type.
        stochastic: stochastic rounding (default) or round to nearest.

    Raises:
        ValueError: if ``param`` is not a quantized weight or ``update`` has the wrong shape.
    """
    if not is_quantized_weight(param):
        raise ValueError(
            "apply_quantized_update (stochastic-rounding write-back) needs a quantized weight created by "
            f"lowrank_train.nn.quantize_model / QuantLinear, got a plain {type(param).__name__} of shape "
            f"{tuple(param.shape)}; update ordinary parameters in place instead"
        )
    if tuple(update.shape) != tuple(param.shape):
        raise ValueError(f"update has shape {tuple(update.shape)}, the quantized weight {tuple(param.shape)}")
    current = param.quantized()
    if current.codes.device != update.device:
        raise ValueError(f"update is on {update.device} but the quantized weight on {current.codes.device}")
    fresh = requantize_update(
        current, update, weight_decay_factor=weight_decay_factor, generator=generator, stochastic=stochastic
    )
    current.codes.copy_(fresh.codes)
    current.scales.copy_(fresh.scales)


def quantization_targets(model: nn.Module, target_modules: TargetModules) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers, by qualified name, that ``target_modules`` selects for quantization (see
    :func:`lowrank_train.nn.surgery.find_target_modules`).

    Raises:
        ValueError: nothing matched, or a selected weight is shared with another module (a tied LM head would be
            quantized while its embedding stayed float: the tie would silently break).
    """
    targets = find_target_modules(model, target_modules, candidate=is_dense_linear)
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear layer in the model")
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    for name, module in targets.items():
        sharing = [owner for owner in owners[id(module.weight)] if owner != name]
        if sharing:
            raise ValueError(
                f"target_modules={target_modules!r} selects {name!r}, whose weight is shared with {sharing[0]!r} "
                "(tied embeddings); quantizing it would untie them. Leave it out of target_modules."
            )
    return targets  # type: ignore[return-value]


def quantize_model(
    model: nn.Module,
    bits: int = 8,
    group_size: int = 256,
    target_modules: TargetModules = None,
) -> nn.Module:
    """Swaps target ``nn.Linear`` layers for :class:`QuantLinear` in place (round-to-nearest initial codes).

    Args:
        model: any module tree.
        bits: 8 (Q-GaLore's weights) or 4.
        group_size: elements per quantization group; the last group is zero-padded when it does not divide.
        target_modules: which ``nn.Linear`` layers, with the package's one meaning
            (:func:`lowrank_train.nn.surgery.find_target_modules`): ``None`` for the linear layers inside the
            repeated blocks (every linear but the output head when there are none), ``"all-linear"``, a regular
            expression fully matching qualified module names, or a list of names / dotted name suffixes.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: bad ``bits``/``group_size``/``target_modules``, no layer matched, a selected weight tied to
            another module, or ``model`` already holds QuantLinear layers (quantizing twice would quantize the
            quantization error; dequantize_model first).
    """
    already = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if already:
        raise ValueError(
            f"model is already quantized ({len(already)} QuantLinear layers, e.g. {already[0]!r}); "
            "quantizing twice is refused. Call dequantize_model(model) first to re-quantize."
        )
    bits = check_bits(bits, WEIGHT_BITS, name="bits", optional=False)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    for name, linear in quantization_targets(model, target_modules).items():
        replace_module(model, name, QuantLinear.from_linear(linear, bits, group_size))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces every :class:`QuantLinear` in place with a plain float ``nn.Linear`` (for export).

    Args:
        model: a module tree, possibly holding QuantLinear layers.
        dtype: weight dtype of the new layers; defaults to each carrier's dtype.

    Returns:
        ``model`` itself (or a new ``nn.Linear`` when ``model`` is itself a QuantLinear).
    """
    if isinstance(model, QuantLinear):
        return model.to_linear(dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            replace_module(model, name, module.to_linear(dtype))
    return model
