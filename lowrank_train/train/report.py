"""Measured memory of a run's weights and optimizer state, next to what AdamW would hold for the same model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_train.memory import measure_live_bytes
from lowrank_train.train.metrics import format_bytes


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every tensor in the optimizer's ``state_dict()`` (inner optimizers included), split by role.

    Returns:
        ``{"states": ..., "bases": ...}``: projection bases (``basis``, ``basis_codes``, ``basis_scales``) apart
        from everything else (moments, quantization statistics, step counters).
    """
    live = measure_live_bytes(nn.Module(), optimizer)
    return {"states": live["optimizer_states"], "bases": live["projection_bases"]}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (INT8 codes + scales for quantized layers; a
    quantized layer's ``weight`` is a one-element carrier of its gradient)."""
    return measure_live_bytes(model)["weights"]


def adamw_reference_bytes(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """What ``torch.optim.AdamW`` holds for the same model with ``dtype`` weights: weights + two moments each.

    torch's AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype, and a scalar fp32 ``step``
    per parameter.
    """
    # FSDP2 parameters are DTensors: this rank's shards, as the measured side counts them.
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    numel = sum(p.numel() for p in params)
    element = torch.empty((), dtype=dtype).element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not _is_quant_buffer(model, b))
    return {"weights": numel * element + buffers, "states": 2 * numel * element + 4 * len(params), "bases": 0}


def _is_quant_buffer(model: nn.Module, buffer: torch.Tensor) -> bool:
    for module in model.modules():
        for name in ("weight_codes", "weight_scales"):
            if module._buffers.get(name) is buffer:
                return True
    return False


@dataclass(frozen=True)
class MemoryTable:
    """Weights + optimizer state of a run against AdamW on the same model (bytes)."""

    optimizer_name: str
    ours: dict[str, int]
    adamw: dict[str, int]

    @property
    def rows(self) -> list[tuple[str, int, int]]:
        """``(component, adamw bytes, our bytes)`` rows, total last."""
        names = [("weights", "weights"), ("optimizer states", "states"), ("projection bases", "bases")]
        rows = [(label, self.adamw[key], self.ours[key]) for label, key in names]
        rows.append(("weights + optimizer", sum(r[1] for r in rows), sum(r[2] for r in rows)))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``summary.json``."""
        return {"optimizer": self.optimizer_name, "ours": dict(self.ours), "adamw": dict(self.adamw)}

    def render(self) -> str:
        """A Markdown table."""
        header = f"| component | AdamW | {self.optimizer_name} | ratio |"
        lines = [header, "|---|---:|---:|---:|"]
        for label, adamw, ours in self.rows:
            ratio = f"{ours / adamw:.2f}x" if adamw else "-"
            lines.append(f"| {label} | {format_bytes(adamw)} | {format_bytes(ours)} | {ratio} |")
        return "\n".join(lines)


def memory_table(
    model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_name: str, dtype: torch.dtype
) -> MemoryTable:
    """Measure ``model`` and ``optimizer`` (after at least one step) and set them next to AdamW's bytes."""
    ours = {"weights": weight_bytes(model), **optimizer_state_bytes(optimizer)}
    return MemoryTable(optimizer_name=optimizer_name, ours=ours, adamw=adamw_reference_bytes(model, dtype))
