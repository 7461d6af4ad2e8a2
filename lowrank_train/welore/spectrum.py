"""Finding the block linears of a model, measuring their inputs, and computing (cached) singular value spectra.

Everything here works on any ``nn.Module`` tree: transformer blocks and their linears are found by
:mod:`lowrank_train.nn.surgery` (by type and structure), so embeddings and the output head (which live outside the
block list) are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lowrank_train.nn.lowrank_linear import weighted_matrix
from lowrank_train.nn.surgery import block_modules, is_dense_linear

__all__ = [
    "InputStatistics",
    "collect_input_statistics",
    "compute_spectra",
    "find_block_linears",
    "limit_threads",
    "load_spectra_cache",
    "model_fingerprint",
    "prepare_calibration",
    "save_spectra_cache",
    "shrink_second_moment",
    "whitening_factor",
]

_CACHE_FORMAT = "lowrank_train.welore.spectra/1"


@contextlib.contextmanager
def limit_threads(num_threads: int | None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(num_threads)`` and restore the previous count afterwards.

    On small shared CPUs one-thread SVDs are far faster than multi-threaded ones when anything else is busy
    (issue 7 measured 20-100x), so every SVD loop in this package runs inside this context.
    """
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def find_block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """All plain ``nn.Linear`` modules inside the model's repeated blocks, by qualified name, in module order.

    The blocks and the layers are :func:`lowrank_train.nn.surgery.block_modules` with
    :func:`~lowrank_train.nn.surgery.is_dense_linear`: the entries of the block ``nn.ModuleList`` (``model.layers``
    in LLaMA), exact ``nn.Linear`` type only (quantized or other subclassed linears carry their own storage).
    Embeddings and the output head sit outside the blocks and are therefore excluded.

    Args:
        model: any module tree, typically a Hugging Face causal LM.

    Returns:
        Ordered mapping from qualified module name to the linear layer.

    Raises:
        ValueError: if the model has no linear layer inside a block.
    """
    found = block_modules(model, is_dense_linear)
    if not found:
        raise ValueError(
            "found no nn.Linear inside the model's blocks (nn.ModuleList children); WeLore needs a model with "
            "dense linear layers in its transformer blocks"
        )
    return found  # type: ignore[return-value]


def model_fingerprint(linears: Mapping[str, nn.Linear]) -> str:
    """SHA-256 over the names, shapes, dtypes and weight bytes of the block linears.

    Args:
        linears: output of :func:`find_block_linears`.

    Returns:
        Hex digest identifying the weights whose spectra are cached.
    """
    digest = hashlib.sha256()
    for name, linear in linears.items():
        weight = linear.weight.detach()
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype};".encode())
        digest.update(weight.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prepare_calibration(calibration: Tensor | Sequence[Tensor], vocab_size: int) -> list[Tensor]:
    """Validate token-id calibration data and return it as a list of ``(1, seq_len)`` long tensors.

    Args:
        calibration: a ``(num_sequences, seq_len)`` integer tensor or a sequence of ``(seq_len,)`` /
            ``(1, seq_len)`` integer tensors.
        vocab_size: number of rows of the model's input embedding.

    Returns:
        One ``(1, seq_len)`` tensor per sequence.

    Raises:
        ValueError: if the set is empty, not integer token ids, or uses ids outside ``[0, vocab_size)``.
    """
    if isinstance(calibration, Tensor):
        if calibration.dim() == 1:
            calibration = calibration[None]
        if calibration.dim() != 2:
            raise ValueError(f"calibration tensor must be (num_sequences, seq_len), got {tuple(calibration.shape)}")
        sequences = list(calibration)
    else:
        sequences = list(calibration)
    if not sequences or all(seq.numel() == 0 for seq in sequences):
        raise ValueError("calibration set is empty; pass a few dozen token sequences")
    prepared = []
    for index, seq in enumerate(sequences):
        if not isinstance(seq, Tensor) or seq.dtype.is_floating_point or seq.dtype == torch.bool:
            raise ValueError(f"calibration sequence {index} must be an integer tensor of token ids")
        seq = seq.reshape(1, -1).long()
        if seq.numel() == 0:
            continue
        low, high = int(seq.min()), int(seq.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"calibration sequence {index} has token ids in [{low}, {high}] but the model's vocabulary has "
                f"{vocab_size} entries; was it tokenized for a different model?"
            )
        prepared.append(seq)
    return prepared


@dataclass(frozen=True)
class InputStatistics:
    """What a calibration pass measured at one linear layer's input.

    Attributes:
        second_moment: ``(in, in)`` float64 ``E[x x^T]`` over all calibration tokens.
        mean_abs: ``(in,)`` float64 ``E[|x|]`` per channel (ASVD's scale).
        num_tokens: number of tokens averaged.
        output_sensitivity: ``E ||dL/dy||^2 / out`` at the layer's output, for loss-based allocation (see
            :mod:`lowrank_train.welore.sensitivity`); ``None`` when not measured.
    """

    second_moment: Tensor
    mean_abs: Tensor
    num_tokens: int
    output_sensitivity: float | None = None


@torch.no_grad()
def collect_input_statistics(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    calibration: Sequence[Tensor],
    num_threads: int | None = 1,
) -> dict[str, InputStatistics]:
    """Run the calibration set through the model and accumulate each linear's input statistics.

    Layers that read the same input tensor (q/k/v, gate/up) share one accumulator, so memory is one ``in x in``
    matrix per distinct input.

    Args:
        model: the model containing ``linears``; called as ``model(input_ids)``.
        linears: the layers to measure, by name.
        calibration: ``(1, seq_len)`` token-id tensors (see :func:`prepare_calibration`).
        num_threads: torch thread count during the pass (``None`` keeps the current one).

    Returns:
        Statistics per linear name.
    """
    device = next(model.parameters()).device
    sums: dict[str, list] = {}  # accumulator key -> [sum x x^T, sum |x|, token count]
    owner: dict[str, str] = {}  # linear name -> accumulator key
    # Inputs already accumulated in the current forward; holding the tensor keeps its id from being reused.
    seen_inputs: dict[int, tuple[str, Tensor]] = {}

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if id(x) in seen_inputs:
                owner.setdefault(name, seen_inputs[id(x)][0])
                return
            key = owner.setdefault(name, name)
            # One sequence's Gram matrix in float32 (fast), the running sum over sequences in float64.
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            acc = sums.setdefault(key, [0.0, 0.0, 0])
            acc[0] = acc[0] + (flat.T @ flat).double()
            acc[1] = acc[1] + flat.abs().sum(0).double()
            acc[2] += flat.shape[0]
            seen_inputs[id(x)] = (key, x)

        return hook

    handles = [linear.register_forward_pre_hook(make_hook(name)) for name, linear in linears.items()]
    was_training = model.training
    model.eval()
    try:
        with limit_threads(num_threads):
            for input_ids in calibration:
                seen_inputs.clear()
                model(input_ids.to(device))
    finally:
        seen_inputs.clear()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats = {}
    for name in linears:
        if name not in owner:
            raise ValueError(f"linear {name!r} was never called during the calibration pass")
        total, abs_sum, count = sums[owner[name]]
        stats[name] = InputStatistics(total.cpu() / count, abs_sum.cpu() / count, count)
    return stats


def shrink_second_moment(second_moment: Tensor, shrinkage: float) -> Tensor:
    """``(1 - a) S + a diag(S)``: move a fraction ``a`` of the input second moment toward its diagonal (issue 16).

    The diagonal (each channel's energy, with the massive-activation channels that every text shares) is kept;
    the cross-channel correlations, which a small or narrow calibration set estimates worst, are damped.

    Args:
        second_moment: ``(in, in)`` symmetric positive semi-definite matrix.
        shrinkage: ``a`` in ``[0, 1]``; 0 returns ``S`` (as float64), 1 its diagonal.

    Returns:
        ``(in, in)`` float64 symmetric matrix with the diagonal of ``S``.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    moment = second_moment.double()
    moment = 0.5 * (moment + moment.T)
    if shrinkage == 0.0:
        return moment
    return (1.0 - shrinkage) * moment + shrinkage * torch.diag(moment.diagonal())


def whitening_factor(second_moment: Tensor, damping: float = 1e-3, shrinkage: float = 0.0) -> Tensor:
    """Lower-triangular ``L`` with ``L L^T = S' + damping * mean(diag S') * I`` (SVD-LLM's whitening).

    ``S'`` is the input second moment ``E[x x^T]`` shrunk toward its diagonal by :func:`shrink_second_moment`
    (``S' = S`` for ``shrinkage=0``). The ridge keeps the Cholesky factor well conditioned when some input
    directions are (nearly) unused, which is common in small calibration sets; without it ``L^-1`` folded into
    the factor can blow up.

    Args:
        second_moment: ``(in, in)`` symmetric positive semi-definite matrix.
        damping: ridge relative to the mean diagonal entry, ``>= 0``.
        shrinkage: fraction moved to the diagonal, in ``[0, 1]``.

    Returns:
        ``(in, in)`` float32 lower-triangular factor.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    moment = shrink_second_moment(second_moment, shrinkage)
    ridge = damping * moment.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(moment + ridge * (10.0**attempt) * eye)
        if int(info) == 0:
            return factor.float()
    raise ValueError("input second moment is not positive definite even after damping; use more calibration data")


def compute_spectra(
    linears: Mapping[str, nn.Linear],
    weightings: Mapping[str, Mapping[str, Tensor]] | None = None,
    num_threads: int | None = 1,
) -> dict[str, Tensor]:
    """Singular values of each (optionally weighted) weight, in float32, one matrix at a time.

    Args:
        linears: layers by name.
        weightings: optional per-name keyword arguments for :func:`weighted_matrix`
            (``{"whitening": L}`` or ``{"input_scale": s}``).
        num_threads: torch thread count for the SVDs.

    Returns:
        Descending ``(min(out, in),)`` float32 singular values per name.
    """
    spectra = {}
    with limit_threads(num_threads), torch.no_grad():
        for name, linear in linears.items():
            extra = dict(weightings[name]) if weightings is not None else {}
            spectra[name] = torch.linalg.svdvals(weighted_matrix(linear.weight, **extra)).cpu()
    return spectra


def load_spectra_cache(path: str | os.PathLike, fingerprint: str, kind: str) -> dict[str, Tensor] | None:
    """Spectra of one kind from a cache file, or ``None`` when the file or that kind is absent.

    Args:
        path: safetensors cache file.
        fingerprint: :func:`model_fingerprint` of the current model.
        kind: spectrum kind key (``"plain"`` or a weighting plus calibration hash).

    Raises:
        ValueError: if the file was written for a different model.
    """
    if not os.path.exists(path):
        return None
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _CACHE_FORMAT:
            raise ValueError(f"{path} is not a WeLore spectra cache (format {metadata.get('format')!r})")
        if metadata.get("fingerprint") != fingerprint:
            raise ValueError(
                f"spectra cache {path} was computed for a different model (fingerprint "
                f"{metadata.get('fingerprint', '?')[:12]}... vs {fingerprint[:12]}...); delete it or pass another path"
            )
        prefix = f"{kind}::"
        spectra = {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
    return spectra or None


def save_spectra_cache(path: str | os.PathLike, fingerprint: str, kind: str, spectra: Mapping[str, Tensor]) -> None:
    """Add one kind of spectra to the cache file (other kinds already in it are kept).

    Args:
        path: safetensors cache file, created if missing.
        fingerprint: :func:`model_fingerprint` of the model.
        kind: spectrum kind key.
        spectra: singular values by linear name.
    """
    tensors: dict[str, Tensor] = {}
    if os.path.exists(path):
        # Validates the fingerprint before anything is overwritten.
        load_spectra_cache(path, fingerprint, kind)
        with safe_open(path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith(f"{kind}::")}
    tensors.update({f"{kind}::{name}": values.float().contiguous() for name, values in spectra.items()})
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    metadata = {
        "format": _CACHE_FORMAT,
        "fingerprint": fingerprint,
        "kinds": json.dumps(sorted({k.split("::")[0] for k in tensors})),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)
