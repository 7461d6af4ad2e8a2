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

from lowrank_train.nn.surgery import block_modules, is_dense_linear

__all__ = [
    "InputStatistics",
    "StatisticsAccumulator",
    "collect_input_statistics",
    "compute_spectra",
    "find_block_linears",
    "limit_threads",
    "load_spectra_cache",
    "model_fingerprint",
    "prepare_calibration",
    "save_spectra_cache",
    "shrink_second_moment",
    "singular_values",
    "truncated_factors",
    "weighted_matrix",
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


class StatisticsAccumulator:
    """Running input statistics of some linear layers over any number of forward passes (the calibration hooks).

    Used as a context manager: inside it, every call of a measured layer adds its input to the sums. Layers that
    read the same input tensor within one pass (q/k/v, gate/up) share one accumulator, so memory is one
    ``in x in`` float64 matrix per distinct input. Call :meth:`start_pass` before each forward (of the whole model
    or of one block) so that sharing is detected per pass.

    Args:
        linears: the layers to measure, by name.
    """

    def __init__(self, linears: Mapping[str, nn.Module]) -> None:
        self._linears = dict(linears)
        self._sums: dict[str, list] = {}  # accumulator key -> [sum x x^T (float64), sum |x| (float64), tokens]
        self._owner: dict[str, str] = {}  # linear name -> accumulator key
        # Inputs already accumulated in the current pass; holding the tensor keeps its id from being reused.
        self._seen: dict[int, tuple[str, Tensor]] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if id(x) in self._seen:
                self._owner.setdefault(name, self._seen[id(x)][0])
                return
            key = self._owner.setdefault(name, name)
            # One sequence's Gram matrix in float32 (fast), the running sum over sequences in float64, added in
            # place (no float64 copy of the Gram matrix; the same numbers as converting it first).
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            gram, abs_sum = flat.T @ flat, flat.abs().sum(0)
            acc = self._sums.get(key)
            if acc is None:
                self._sums[key] = [gram.double(), abs_sum.double(), flat.shape[0]]
            else:
                acc[0].add_(gram)
                acc[1].add_(abs_sum)
                acc[2] += flat.shape[0]
            self._seen[id(x)] = (key, x)

        return hook

    def __enter__(self) -> StatisticsAccumulator:
        self._handles = [linear.register_forward_pre_hook(self._hook(n)) for n, linear in self._linears.items()]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._seen.clear()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start_pass(self) -> None:
        """Forget the inputs of the previous pass (call before each forward)."""
        self._seen.clear()

    def statistics(self) -> dict[str, InputStatistics]:
        """The averages, on the CPU, per linear name; layers that shared an input share the tensors. Consumes the
        sums.

        Raises:
            ValueError: if a layer was never called.
        """
        self._seen.clear()
        finished: dict[str, InputStatistics] = {}
        stats = {}
        for name in self._linears:
            if name not in self._owner:
                raise ValueError(f"linear {name!r} was never called during the calibration pass")
            key = self._owner[name]
            if key not in finished:
                total, abs_sum, count = self._sums.pop(key)
                finished[key] = InputStatistics(total.cpu().div_(count), abs_sum.cpu().div_(count), count)
            stats[name] = finished[key]
        return stats


@torch.no_grad()
def collect_input_statistics(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    calibration: Sequence[Tensor],
    num_threads: int | None = 1,
) -> dict[str, InputStatistics]:
    """Run the calibration set through the whole model and accumulate each linear's input statistics.

    Every layer's statistics are alive at once (``compress_model`` goes block by block instead, see
    :mod:`lowrank_train.welore.blockwise`). Layers that read the same input tensor (q/k/v, gate/up) share one
    accumulator and one result, so memory is one ``in x in`` float64 matrix per distinct input.

    Args:
        model: the model containing ``linears``; called as ``model(input_ids)``.
        linears: the layers to measure, by name.
        calibration: ``(1, seq_len)`` token-id tensors (see :func:`prepare_calibration`).
        num_threads: torch thread count during the pass (``None`` keeps the current one).

    Returns:
        Statistics per linear name.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with limit_threads(num_threads), StatisticsAccumulator(linears) as accumulator:
            for input_ids in calibration:
                accumulator.start_pass()
                model(input_ids.to(device))
            return accumulator.statistics()
    finally:
        model.train(was_training)


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
    # In place on one new float64 matrix (an 11008^2 moment is ~1 GB): the same numbers as the formula above.
    moment = second_moment.double()
    moment = (moment + moment.T).mul_(0.5)
    if shrinkage == 0.0:
        return moment
    diagonal = moment.diagonal().clone()
    moment.mul_(1.0 - shrinkage).diagonal().add_(shrinkage * diagonal)
    return moment


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
    moment = shrink_second_moment(second_moment, shrinkage)  # a new matrix: ours to modify
    ridge = damping * moment.diagonal().mean().clamp_min(1e-12)
    diagonal = moment.diagonal().clone()
    for attempt in range(6):
        # The ridge goes onto the diagonal in place (no identity matrix, no second copy): S' + r * I exactly.
        moment.diagonal().copy_(diagonal + ridge * (10.0**attempt))
        factor, info = torch.linalg.cholesky_ex(moment)
        if int(info) == 0:
            del moment
            return factor.float()
    raise ValueError("input second moment is not positive definite even after damping; use more calibration data")


def _short_side_gram(matrix: Tensor, chunk: int = 4096) -> Tensor:
    # float64 M M^T (or M^T M when M is tall), the small side squared, summed over column chunks of the long side
    # so that no float64 copy of M is ever made.
    wide = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    gram = torch.zeros(wide.shape[0], wide.shape[0], dtype=torch.float64, device=wide.device)
    for start in range(0, wide.shape[1], chunk):
        piece = wide[:, start : start + chunk].double()
        gram.addmm_(piece, piece.T)
    return gram


def singular_values(matrix: Tensor) -> Tensor:
    """Descending singular values of an ``(m, n)`` matrix, from the eigenvalues of its smaller float64 Gram matrix.

    At 7B shapes this is several times faster than LAPACK's SVD (a 4096 x 11008 ``svdvals`` took 458 s on this
    project's 2-core CPU; the Gram product and ``eigvalsh`` about 70 s). In float64 the absolute error is about
    ``1e-8 * s_max`` (the square root of float64's epsilon), no worse than a float32 SVD's ``6e-8 * s_max``.

    Args:
        matrix: ``(m, n)`` float32 or float64.

    Returns:
        ``(min(m, n),)`` singular values, descending, in ``matrix``'s dtype.
    """
    eigenvalues = torch.linalg.eigvalsh(_short_side_gram(matrix))
    return eigenvalues.clamp_min(0.0).sqrt().flip(0).to(matrix.dtype)


def _check_weighting(weight: Tensor, input_scale: Tensor | None, whitening: Tensor | None) -> None:
    in_features = weight.shape[1]
    if input_scale is not None and whitening is not None:
        raise ValueError("pass at most one of input_scale (ASVD) and whitening (SVD-LLM), not both")
    if input_scale is not None:
        if input_scale.shape != (in_features,):
            raise ValueError(f"input_scale must have shape ({in_features},), got {tuple(input_scale.shape)}")
        if not bool(torch.all(input_scale > 0)):
            raise ValueError("input_scale must be strictly positive (it is inverted when folded back)")
    if whitening is not None and whitening.shape != (in_features, in_features):
        raise ValueError(
            f"whitening must be a lower-triangular ({in_features}, {in_features}) factor, got {tuple(whitening.shape)}"
        )


def weighted_matrix(weight: Tensor, input_scale: Tensor | None = None, whitening: Tensor | None = None) -> Tensor:
    """The matrix whose SVD is truncated: ``W``, ``W diag(s)`` or ``W L``, in float32 (float64 stays float64).

    ``input_scale`` (ASVD, Yuan et al., 2023) keeps the directions loud input channels use; ``whitening`` (SVD-LLM,
    Wang et al., 2024) makes the truncation minimise ``||(W - A B) X||_F`` over rank-``k`` products.

    Args:
        weight: ``(out, in)`` weight of a linear layer, any float dtype.
        input_scale: optional ``(in,)`` positive per-channel scales (ASVD).
        whitening: optional ``(in, in)`` lower-triangular factor ``L`` with ``L L^T = E[x x^T]`` (SVD-LLM).

    Returns:
        ``(out, in)`` matrix in float32 or float64.

    Raises:
        ValueError: both weightings, or one of the wrong shape (or a non-positive scale).
    """
    _check_weighting(weight, input_scale, whitening)
    # bf16/fp16 SVDs are inaccurate (and unsupported on CPU): always work in at least float32.
    matrix = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    if input_scale is not None:
        return matrix * input_scale.to(matrix.device, matrix.dtype)
    if whitening is not None:
        return matrix @ whitening.to(matrix.device, matrix.dtype)
    return matrix


def truncated_factors(
    weight: Tensor,
    rank: int,
    input_scale: Tensor | None = None,
    whitening: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-``k`` factors ``A, B`` with ``A @ B ~= W`` from the weighted matrix's smaller float64 Gram matrix.

    WeLore's one factorization (:class:`~lowrank_train.nn.lowrank_linear.LowRankLinear` holds the result). The
    factors are those of the truncated SVD of :func:`weighted_matrix` (up to the sign of each direction), at a
    fraction of LAPACK's cost at 7B shapes (see :func:`singular_values`).

    With ``M = W R`` the weighted matrix (``R`` = ``I``, ``diag(s)`` or the whitening factor ``L``) and
    ``M = U S V^T``: ``A = U_k S_k^1/2`` and ``B = S_k^1/2 V_k^T R^-1``. When ``M`` is wide (``out <= in``) the
    eigenvectors of ``M M^T`` are ``U``, and ``B = S_k^-1/2 U_k^T W`` needs no ``R^-1`` at all (no triangular
    solve with ``L``). When it is tall, the eigenvectors of ``M^T M`` are ``V``, ``A = M V_k S_k^-1/2``, and
    ``R^-1`` is applied by a triangular solve. A direction whose singular value is zero gets zero factors.

    Args:
        weight: ``(out, in)`` weight, any float dtype.
        rank: number of directions kept, ``1 <= rank <= min(out, in)``.
        input_scale: optional ``(in,)`` positive ASVD channel scales.
        whitening: optional ``(in, in)`` lower-triangular SVD-LLM whitening factor.

    Returns:
        ``A`` of shape ``(out, rank)`` and ``B`` of shape ``(rank, in)``, float32 (float64 for float64 weights).
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}] for a {tuple(weight.shape)} weight")
    matrix = weighted_matrix(weight, input_scale, whitening)
    work = matrix.dtype
    eigenvalues, eigenvectors = torch.linalg.eigh(_short_side_gram(matrix))
    basis = eigenvectors[:, -rank:].flip(-1).to(work)  # top-k, descending
    root = eigenvalues[-rank:].flip(0).clamp_min(0.0).sqrt().sqrt()  # s^1/2
    inverse_root = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    root, inverse_root = root.to(work), inverse_root.to(work)
    if out_features <= in_features:
        factor_out = basis * root
        factor_in = (basis.T @ weight.detach().to(work)) * inverse_root[:, None]
        return factor_out, factor_in
    factor_out = (matrix @ basis) * inverse_root
    factor_in = root[:, None] * basis.T
    if input_scale is not None:
        factor_in = factor_in / input_scale.to(factor_in.device, work)
    elif whitening is not None:
        # B = C L^-1  <=>  L^T B^T = C^T, a triangular solve (no explicit inverse).
        lower = whitening.to(factor_in.device, work)
        factor_in = torch.linalg.solve_triangular(lower.T, factor_in.T, upper=True).T
    return factor_out, factor_in


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
            spectra[name] = singular_values(weighted_matrix(linear.weight, **extra)).cpu()
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
