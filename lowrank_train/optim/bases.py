"""Registry of inner ("base") optimizers, resolved lazily so optional libraries load only when used."""

from __future__ import annotations

import importlib
import sys

import torch

# name -> "module:attribute"
BASE_OPTIMIZERS: dict[str, str] = {
    "adamw": "torch.optim:AdamW",
    "adam": "torch.optim:Adam",
    "sgd": "torch.optim:SGD",
    "adamw8bit": "bitsandbytes.optim:AdamW8bit",
    "paged_adamw8bit": "bitsandbytes.optim:PagedAdamW8bit",
    "adafactor": "transformers.optimization:Adafactor",
    "adamw4bit": "torchao.optim:AdamW4bit",
}


# Names whose optimizer updates each parameter from its own gradient and state alone (no sum, norm or counter across
# parameters): GaLore then steps the projected weights a few at a time, so the inner updates alive at once fit in the
# largest weight instead of growing with depth (issue 21).
PER_PARAMETER_BASES: set[str] = {"adamw", "adam", "sgd", "adamw8bit", "paged_adamw8bit", "adafactor", "adamw4bit"}


def steps_each_parameter_alone(cls: type[torch.optim.Optimizer]) -> bool:
    """True when ``cls`` is the class of a name in :data:`PER_PARAMETER_BASES` (exactly: not a subclass, whose
    ``step`` may differ). Looks only at modules already imported: the class was resolved from one."""
    for name in PER_PARAMETER_BASES:
        module, attr = BASE_OPTIMIZERS[name].split(":")
        loaded = sys.modules.get(module)
        if loaded is not None and getattr(loaded, attr, None) is cls:
            return True
    return False


def resolve_base(base: type[torch.optim.Optimizer] | str) -> type[torch.optim.Optimizer]:
    """Returns the optimizer class for ``base`` (a class or a registered name).

    Raises:
        ValueError: for an unknown name, or a class that is not a ``torch.optim.Optimizer``.
    """
    if isinstance(base, str):
        target = BASE_OPTIMIZERS.get(base.lower())
        if target is None:
            raise ValueError(f"unknown base optimizer {base!r}; expected a class or one of {sorted(BASE_OPTIMIZERS)}")
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as err:
            raise ValueError(f"base optimizer {base!r} needs the package that provides {module}: {err}") from err
    if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
        raise ValueError(f"base must be a torch.optim.Optimizer subclass or a registered name, got {base!r}")
    return base
