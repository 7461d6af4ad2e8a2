"""Mixed-precision rules shared by this package's custom autograd functions (issue 13).

Why not ``torch.amp.custom_fwd`` / ``custom_bwd``: they bind one ``device_type`` when the function is defined, and
``cast_inputs`` needs one fixed dtype, while our functions serve CPU and CUDA tensors under whichever autocast dtype
is active. So each function reads the autocast state of its input's own device once, in forward, through
:func:`autocast_dtype`, keeps the chosen compute dtype with its saved tensors, and runs both passes inside
:func:`autocast_disabled` with explicit casts: what ``custom_fwd(cast_inputs=...)`` + ``custom_bwd`` do, for any
device, and independent of the autocast state that happens to be active when backward runs.

The dtypes follow ``nn.Linear`` under autocast: matmuls in the autocast dtype, inputs saved in that dtype, and
every gradient handed back in the dtype of the tensor it belongs to (a weight's gradient in the parameter's
precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor


def autocast_dtype(tensor: Tensor) -> torch.dtype | None:
    """The dtype autocast runs a matmul on ``tensor`` in, or ``None`` when autocast leaves it alone.

    ``None`` when autocast is off for ``tensor``'s device type, and for tensors autocast never casts (integer and
    float64 ones).
    """
    device_type = tensor.device.type
    if not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return None
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_disabled(tensor: Tensor) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``tensor``'s device type, so explicit casts alone decide the dtypes."""
    device_type = tensor.device.type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def autocast_disabled_on(tensors: Iterable[Tensor]) -> contextlib.ExitStack:
    """A context with autocast off for the device types of ``tensors``: for optimizer steps, whose projections and
    bases must keep their fp32 precision even when ``step()`` is called inside an autocast region (issue 13)."""
    stack = contextlib.ExitStack()
    for device_type in sorted({t.device.type for t in tensors}):
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
    return stack
