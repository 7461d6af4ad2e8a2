"""SCALE (Glentis et al. 2025, arXiv 2506.16659): column-normalized SGD with momentum on the output layer only.

The stateless end of the APOLLO / Fira family (issue 21): no second moments at all, and a first moment only where
the paper finds the gradient noise highest, the output head. For each weight W with gradient G the step is

    M = beta M + (1 - beta) G   (the head only; every other weight uses M = G, and keeps no state)
    W <- W (1 - lr * weight_decay) - lr * C(M)

where C divides each output unit's incoming weights (a row of a torch ``Linear`` weight, a column of an embedding
table) by their root mean square. The paper writes C with the column's L2 norm; the authors' code uses the RMS
(the L2 norm over sqrt(fan-in)), which keeps one learning rate right for every width, and so do we. 1-D
parameters (norm gains, biases) take AdamW, as in the authors' code.

Roles of a parameter (the group keys say which; :func:`scale_param_groups` sets them from parameter names):

==========  ============================================================  =================================
``matrix``  2-D, ``last_layer`` False: ``C(G)``                           no state
``head``    2-D, ``last_layer`` True: ``C(M)``                            ``momentum_buffer`` (param dtype)
``vector``  1-D: AdamW with the group's ``betas`` / ``eps``               ``step`` (fp32, CPU), ``exp_avg``,
                                                                          ``exp_avg_sq`` (param dtype)
==========  ============================================================  =================================

All state is tensors, so ``torch.load(weights_only=True)`` restores it and resume is bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

_RMS_FLOOR = 1e-8  # an all-zero row keeps a finite step (the authors' clamp)
# Output heads and input embeddings by the last component of their module name (LLaMA / GPT-2 / GPT-NeoX / T5...).
HEAD_MODULE_NAMES = frozenset({"lm_head", "embed_out", "output"})
EMBEDDING_MODULE_NAMES = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings"})
SCALE_GROUP_KEYS = frozenset({"lr", "weight_decay", "momentum", "betas", "eps", "last_layer", "norm_dim"})
_BOOKKEEPING = frozenset({"params", "param_names", "name", "initial_lr", "base_lr", "max_lr", "min_lr"})


# ----- pure functions -----------------------------------------------------------------------------------------
def column_normalize(matrix: torch.Tensor, norm_dim: int) -> torch.Tensor:
    """``matrix`` divided by its root mean square along ``norm_dim`` (the paper's C, RMS-scaled).

    Args:
        matrix: (m, n) gradient or momentum.
        norm_dim: 1 for a torch ``Linear`` weight (out, in): each output row is normalized over its inputs; 0 for
            an embedding table (vocab, hidden): each hidden unit over the vocabulary.

    Returns:
        fp32 (m, n) tensor whose slices along ``norm_dim`` have unit RMS (or are zero).
    """
    matrix = matrix.float()
    rms = matrix.square().mean(dim=norm_dim, keepdim=True).sqrt_().clamp_min_(_RMS_FLOOR)
    return matrix / rms


def scale_matrix_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    norm_dim: int,
) -> None:
    """One SCALE step of a 2-D weight, in place: decoupled decay, then ``-lr * C(M)``.

    Args:
        param: (m, n) weight.
        grad: (m, n) its gradient.
        momentum_buffer: (m, n) the head's first moment (updated in place), or ``None`` for a stateless matrix.
        lr: learning rate.
        weight_decay: decoupled decay coefficient.
        momentum: beta of the head's moment (unused without a buffer).
        norm_dim: see :func:`column_normalize`.
    """
    direction = grad
    if momentum_buffer is not None:
        momentum_buffer.lerp_(grad.to(momentum_buffer.dtype), 1 - momentum)
        direction = momentum_buffer
    update = column_normalize(direction, norm_dim)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr)


def adamw_vector_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """torch AdamW's update of a 1-D parameter, in place (``step``, ``exp_avg``, ``exp_avg_sq`` of ``state``)."""
    beta1, beta2 = betas
    state["step"].add_(1)
    step = float(state["step"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


# ----- groups -------------------------------------------------------------------------------------------------
def _module_of(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def scale_param_groups(groups: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Splits groups so that the output head gets ``last_layer=True`` and embeddings ``norm_dim=0``, by name.

    A parameter is the head when its module's name is one of :data:`HEAD_MODULE_NAMES` (``lm_head``...), an
    embedding when it is one of :data:`EMBEDDING_MODULE_NAMES`. A group that sets ``last_layer`` or ``norm_dim``
    itself is kept as it is. With tied embeddings no parameter is named as a head: give the embedding a group with
    ``last_layer=True`` (and ``norm_dim=0``) to put the momentum there.

    Args:
        groups: param groups with ``param_names`` (as the training loop and the Trainer glue build them).

    Returns:
        New groups (each role of each input group its own group; the other keys copied).

    Raises:
        ValueError: for a group without ``param_names`` that does not say ``last_layer`` itself.
    """
    split: list[dict[str, Any]] = []
    for index, group in enumerate(groups):
        if "last_layer" in group or "norm_dim" in group:
            split.append(dict(group))
            continue
        params = group["params"]
        params = [params] if torch.is_tensor(params) else list(params)
        names = group.get("param_names")
        if not names or len(names) != len(params):
            raise ValueError(
                f"SCALE param group {index}: without param_names the output layer is unknown: give the groups "
                "param_names, or the head its own group with last_layer=True"
            )
        roles: dict[tuple[bool, int], list[tuple[str, torch.Tensor]]] = {}
        for name, param in zip(names, params, strict=True):
            module = _module_of(name)
            key = (module in HEAD_MODULE_NAMES, 0 if module in EMBEDDING_MODULE_NAMES else 1)
            roles.setdefault(key, []).append((name, param))
        for (last_layer, norm_dim), members in roles.items():
            split.append(
                {
                    **group,
                    "params": [p for _, p in members],
                    "param_names": [n for n, _ in members],
                    "last_layer": last_layer,
                    "norm_dim": norm_dim,
                }
            )
    return split


class SCALE(torch.optim.Optimizer):
    """SCALE (arXiv 2506.16659): column-normalized gradients, momentum only on the output layer (``last_layer``).

    Args:
        params: parameters or param groups. Group keys: ``lr``, ``weight_decay``, ``momentum`` (the head's beta),
            ``betas`` / ``eps`` (AdamW of 1-D parameters), ``last_layer`` (this group is the output head: keep a
            momentum), ``norm_dim`` (1: normalize each row, as for a ``Linear`` weight; 0: each column, as for an
            embedding). :func:`scale_param_groups` sets the last two from parameter names.
        lr: learning rate.
        momentum: beta of the head's first moment (the paper's 0.9).
        weight_decay: decoupled weight decay.
        betas: AdamW's betas for 1-D parameters.
        eps: AdamW's eps for 1-D parameters.

    Raises:
        ValueError: an unknown group key, a value out of range, a parameter that is neither 1-D nor 2-D, or a 1-D
            parameter in a ``last_layer`` group.

    Example:
        >>> named = list(model.named_parameters())
        >>> groups = scale_param_groups([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}])
        >>> opt = SCALE(groups, lr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "betas": tuple(betas),
            "eps": eps,
            "last_layer": False,
            "norm_dim": 1,
        }
        _check_values(defaults, "SCALE")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group after checking its keys, values and parameter shapes (see the class docstring)."""
        where = f"SCALE param group {len(self.param_groups)}"
        unknown = sorted(set(param_group) - SCALE_GROUP_KEYS - _BOOKKEEPING)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; SCALE takes {sorted(SCALE_GROUP_KEYS)}")
        _check_values(param_group, where)
        params = param_group["params"]
        params = [params] if torch.is_tensor(params) else list(params)
        last_layer = param_group.get("last_layer", self.defaults.get("last_layer", False))
        for i, p in enumerate(params):
            names = param_group.get("param_names")
            label = f"{names[i] if names else f'params[{i}]'} (shape {tuple(p.shape)})"
            if p.dim() not in (1, 2):
                raise ValueError(f"{where}: SCALE steps 1-D and 2-D parameters; {label} is {p.dim()}-D")
            if p.dim() == 1 and last_layer:
                raise ValueError(f"{where}: last_layer=True is for the 2-D output head; {label} is 1-D")
        super().add_param_group({**param_group, "params": params})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one SCALE step (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._step_param(p, group)
        return loss

    def _step_param(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if param.dim() == 1:
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            adamw_vector_step(
                param, param.grad, state, lr=group["lr"], weight_decay=group["weight_decay"],
                betas=group["betas"], eps=group["eps"],
            )  # fmt: skip
            return
        buffer = None
        if group["last_layer"]:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buffer = state["momentum_buffer"]
        scale_matrix_step(
            param, param.grad, buffer, lr=group["lr"], weight_decay=group["weight_decay"],
            momentum=group["momentum"], norm_dim=group["norm_dim"],
        )  # fmt: skip


def _check_values(group: Mapping[str, Any], where: str) -> None:
    """Range checks of SCALE's group values (each named in the message)."""
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "lr": (lambda v: isinstance(v, (int, float)) and 0 <= v < math.inf, "a number >= 0"),
        "weight_decay": (lambda v: isinstance(v, (int, float)) and 0 <= v < math.inf, ">= 0"),
        "momentum": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
        "eps": (lambda v: isinstance(v, (int, float)) and 0 <= v < math.inf, ">= 0"),
        "betas": (lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v), "2 in [0, 1)"),
        "last_layer": (lambda v: isinstance(v, bool), "True or False"),
        "norm_dim": (lambda v: v in (0, 1) and not isinstance(v, bool), "0 or 1"),
    }
    for key, (ok, allowed) in checks.items():
        if key in group:
            try:
                valid = ok(group[key])
            except TypeError:
                valid = False
            if not valid:
                raise ValueError(f"{where}: {key} must be {allowed}, got {group[key]!r}")


def build_scale(
    param_groups: list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> SCALE:
    """The optimizer registry's builder: :func:`scale_param_groups`, momentum ``betas[0]`` on the head."""
    return SCALE(
        scale_param_groups(param_groups), lr=lr, momentum=betas[0], weight_decay=weight_decay, betas=betas, eps=eps
    )


def scale_state_bytes(role: str, numel: int, dtype_bytes: int) -> int:
    """Optimizer-state bytes of one parameter by role, for the memory estimator (the registry entry's)."""
    if role == "head":
        return numel * dtype_bytes  # the momentum buffer
    if role == "norm":
        return 2 * numel * dtype_bytes + 4  # AdamW's two moments and the fp32 step
    return 0  # block linears and the input embedding: no state


__all__ = [
    "EMBEDDING_MODULE_NAMES",
    "HEAD_MODULE_NAMES",
    "SCALE",
    "adamw_vector_step",
    "build_scale",
    "column_normalize",
    "scale_matrix_step",
    "scale_param_groups",
    "scale_state_bytes",
]
