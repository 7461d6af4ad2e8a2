"""Memory estimator: bytes of weights, gradients, optimizer states, bases, activations and logits, and the peak.

Why: users of GaLore cannot tell what will fit before they try (GaLore#6, #67, transformers#29822; issue 8). This
module predicts, from a LLaMA-style model config and a training config, what a training step of this library holds:

* static: weights (float, or INT8/INT4 codes + fp32 group scales), optimizer states (full or projected moments,
  32- or 8-bit) and projection bases (fp32, or packed INT4/INT8 codes + scales);
* gradients: every trainable parameter's gradient until ``step()``, or only the largest one in layer-wise mode
  (the layer-wise engine frees each gradient inside backward, issue 4);
* activations: the tensors autograd saves for backward. The per-layer formula is derived from what Hugging Face's
  ``LlamaDecoderLayer`` with SDPA attention saves (RMSNorm: the fp32 input, the normalised value and the output;
  attention: q, k, v, the output and the fp32 log-sum-exp; MLP: gate, SiLU, up and their product; RoPE saves only
  cos/sin) and checked against saved-tensor hooks in ``tests/test_memory.py``; with activation checkpointing only
  each layer's input is kept, plus one layer recomputed during its backward;
* logits: ``log_softmax`` output, its gradient and the gradient of the logits, all fp32 (batch x seq x vocab each),
  or with :func:`lowrank_train.nn.chunked_cross_entropy` only a few chunks of them;
* transients: the optimizer step's largest temporary (a full-size update for GaLore, dequantized fp32 weight and
  update for INT8 write-back) and a basis refresh (an exact SVD holds an fp32 copy of the gradient plus U and V^T).

The peak is the static part plus the largest of three moments: the start of backward (all activations, logits and
the head's gradient), the end of backward (all gradients, one layer's activations) and the optimizer step.
Allocator caching and fragmentation are not modelled; on a GPU add the CUDA context (~0.5 GB) to compare with
``nvidia-smi``, ``torch.cuda.max_memory_allocated`` excludes it.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowrank_train.optim.registry import OptimizerMethod, get_optimizer_method, optimizer_names

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_PROJECTORS = ("svd", "rsvd", "random")
# bitsandbytes' blockwise 8-bit optimizers: one fp32 absmax per 256 values, two 256-entry fp32 code maps per
# optimizer (shared by its parameters), and 32-bit states for tensors under 4096 elements (its ``min_8bit_size``).
_BNB_BLOCK = 256
_BNB_MIN_8BIT = 4096
_QMAP_BYTES = 2 * 256 * 4
# bitsandbytes' CPU 8-bit step dequantizes moments, gradient and parameter to fp32 for the whole tensor: measured
# ~26 bytes per element of process peak on the first step (2 of them the 8-bit moments), see llama7b_memory.md.
_BNB_CPU_TEMP_BYTES = 24
GIB = 1024**3

_MODEL_ALIASES = {
    "vocab_size": ("vocab_size", "vocab"),
    "hidden_size": ("hidden_size", "hidden", "dim", "d_model"),
    "intermediate_size": ("intermediate_size", "intermediate", "ffn_dim"),
    "num_layers": ("num_hidden_layers", "num_layers", "layers", "n_layers"),
    "num_heads": ("num_attention_heads", "num_heads", "heads", "n_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "kv_heads", "n_kv_heads"),
    "tie_embeddings": ("tie_word_embeddings", "tie_embeddings", "tied"),
}
_TRAIN_ALIASES = {
    "batch_size": ("batch_size", "batch", "micro_batch_size"),
    "seq_len": ("seq_len", "sequence_length", "max_seq_len", "seq_length", "seq"),
    "activation_checkpointing": ("activation_checkpointing", "gradient_checkpointing"),
    "optimizer": ("optimizer", "optim"),
    "loss_chunk_size": ("loss_chunk_size", "chunk_size"),
}


def _as_mapping(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if hasattr(config, "to_dict"):  # transformers' PretrainedConfig
        return dict(config.to_dict())
    return dict(vars(config))


def _pick(source: dict[str, Any], aliases: dict[str, tuple[str, ...]], names: tuple[str, ...]) -> dict[str, Any]:
    picked: dict[str, Any] = {}
    for name in names:
        for key in aliases.get(name, (name,)):
            if key in source and source[key] is not None:
                picked[name] = source[key]
                break
    return picked


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a LLaMA-style decoder that memory depends on.

    Attributes:
        vocab_size: V.
        hidden_size: h.
        intermediate_size: f, the MLP width.
        num_layers: L.
        num_heads: query heads H (head dim h / H).
        num_kv_heads: key/value heads (grouped-query attention); defaults to ``num_heads``.
        tie_embeddings: the output head shares the embedding matrix.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        kv = self.num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or self.num_heads % kv:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={self.num_heads}, got {kv!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Builds a shape from a ``LlamaConfig``, a dict (HF or short key names) or a dataclass.

        Raises:
            ValueError: when a required number is missing.
        """
        if isinstance(config, ModelShape):
            return config
        values = _pick(_as_mapping(config), _MODEL_ALIASES, tuple(f.name for f in dataclasses.fields(cls)))
        missing = [
            n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads") if n not in values
        ]
        if missing:
            raise ValueError(f"model config lacks {missing}; expected LLaMA keys such as {list(_MODEL_ALIASES)}")
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        """Width of the k and v projections: kv heads x head dim."""
        return self.num_kv_heads * self.head_dim

    def block_linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of the seven linear layers of one decoder block: q, k, v, o, gate, up, down."""
        h, f, kv = self.hidden_size, self.intermediate_size, self.kv_size
        return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]

    def num_parameters(self) -> int:
        h, v = self.hidden_size, self.vocab_size
        block = sum(m * n for m, n in self.block_linear_shapes()) + 2 * h
        return self.num_layers * block + v * h * (1 if self.tie_embeddings else 2) + h


@dataclass(frozen=True)
class TrainingSetup:
    """What a training step holds besides the model: batch, precision, optimizer, tricks.

    Attributes:
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        dtype: parameter / activation dtype: "bfloat16", "float16" or "float32".
        optimizer: a registered optimizer method (:mod:`lowrank_train.optim.registry`): "adamw" (torch),
            "adamw8bit" (bitsandbytes), "galore" (GaLore around AdamW), "galore8bit" (GaLore around 8-bit AdamW),
            "qgalore" (GaLore 8-bit + quantized basis + INT8 weights), "qgalore4bit" (the same with torchao's
            4-bit moments), ... Its entry says whether gradients are projected, its moment bits and defaults.
        rank: projection rank of the linear layers inside the blocks (GaLore kinds only).
        projector: "svd", "rsvd" or "random" (the last stores no basis).
        proj_bits: basis storage: None (the method's default: fp32, or 4 for Q-GaLore), 8 or 4 (packed).
        proj_group_size: elements per basis quantization group.
        weight_bits: None (the method's default: float weights, or 8 for Q-GaLore) or 8/4 for the block linear
            layers.
        weight_group_size: elements per weight quantization group.
        adaptive_refresh: layer-adaptive refresh keeps a similarity history per weight (None: the method's
            default).
        moment_bits: overrides the width of the projected (GaLore) or full moments: 32, 8 or 4 (4: the plain
            group's too, as with ``QGaLoreAdamW4bit``). None: the method's own.
        layerwise: parameters are stepped inside backward and their gradients freed at once (issue 4).
        activation_checkpointing: only block inputs are kept; one block is recomputed during its backward.
        chunked_loss: cross-entropy by chunks (:func:`lowrank_train.nn.chunked_cross_entropy`).
        loss_chunk_size: tokens per chunk of the chunked loss.
        accumulation_steps: micro-batches per step; > 1 keeps gradient accumulators (projected ones in GaLore).
        oversample: extra sketch columns of the "rsvd" projector.
        device: "cuda" or "cpu"; on "cpu" bitsandbytes' 8-bit optimizer step runs through fp32 temporaries of the
            whole tensor (measured ~24 bytes per element), which becomes the largest transient.
    """

    batch_size: int = 1
    seq_len: int = 256
    dtype: str = "bfloat16"
    optimizer: str = "adamw"
    rank: int | None = None
    projector: str = "svd"
    proj_bits: int | None = None
    proj_group_size: int = 256
    weight_bits: int | None = None
    weight_group_size: int = 256
    adaptive_refresh: bool | None = None
    moment_bits: int | None = None
    layerwise: bool = False
    activation_checkpointing: bool = False
    chunked_loss: bool = False
    loss_chunk_size: int = 1024
    accumulation_steps: int = 1
    oversample: int = 8
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        for name in ("batch_size", "seq_len", "proj_group_size", "weight_group_size", "loss_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {self.accumulation_steps!r}")
        dtype = str(self.dtype).replace("torch.", "")
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        optimizer = str(self.optimizer).lower()
        try:
            method = get_optimizer_method(optimizer)
        except ValueError as error:
            raise ValueError(f"optimizer: {error}") from None
        object.__setattr__(self, "optimizer", optimizer)
        if method.lowrank:
            if self.rank is None or isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
                raise ValueError(f"optimizer {optimizer!r} projects gradients: rank must be a positive integer")
            if self.projector not in _PROJECTORS:
                raise ValueError(f"projector must be one of {_PROJECTORS}, got {self.projector!r}")
        # The method's defaults (Q-GaLore, arXiv 2407.08296: INT4 basis, INT8 weights, adaptive refresh).
        for name in ("proj_bits", "weight_bits", "adaptive_refresh"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(method, name))
        if self.proj_bits not in (None, 4, 8):
            raise ValueError(f"proj_bits must be None, 4 or 8, got {self.proj_bits!r}")
        if self.weight_bits not in (None, 4, 8):
            raise ValueError(f"weight_bits must be None, 4 or 8, got {self.weight_bits!r}")
        if self.weight_bits is not None and not method.lowrank:
            family = ", ".join(optimizer_names(lowrank=True))
            raise ValueError(
                f"weight_bits={self.weight_bits} needs a GaLore optimizer ({family}): only its stochastic-rounding "
                f"write-back can update quantized weights, not {optimizer!r}"
            )
        if self.moment_bits not in (None, 4, 8, 32):
            raise ValueError(f"moment_bits must be None, 4, 8 or 32, got {self.moment_bits!r}")

    @classmethod
    def from_config(cls, config: Any) -> TrainingSetup:
        """Builds a setup from a dict or dataclass; keys this estimator does not use (lr, ...) are ignored."""
        if isinstance(config, TrainingSetup):
            return config
        return cls(**_pick(_as_mapping(config), _TRAIN_ALIASES, tuple(f.name for f in dataclasses.fields(cls))))

    @property
    def method(self) -> OptimizerMethod:
        """The optimizer's registry entry."""
        return get_optimizer_method(self.optimizer)

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes of one training step. ``peak`` = static + the largest dynamic moment.

    Attributes:
        weights: parameters (float) or codes + scales (quantized), plus buffers.
        gradients: gradients alive at once (all of them, or the largest one in layer-wise mode, plus accumulators).
        optimizer_states: moments (full or projected) and per-parameter counters.
        projection_bases: GaLore bases (fp32 or quantized codes + scales).
        activations: tensors saved for backward by the model body (embedding to final norm).
        logits: the loss's own peak (fp32 log-probabilities and gradients, or chunks of them).
        transient: the largest temporary of the optimizer step or a basis refresh.
        peak: static + max(start of backward, end of backward, optimizer step).
        details: named sub-items (bytes) behind the components, for the table.
        model: the model shape used.
        setup: the training setup used.
    """

    weights: int
    gradients: int
    optimizer_states: int
    projection_bases: int
    activations: int
    logits: int
    transient: int
    peak: int
    details: dict[str, int] = field(default_factory=dict)
    model: ModelShape | None = None
    setup: TrainingSetup | None = None

    @property
    def static(self) -> int:
        """Bytes held for the whole run: weights, optimizer states and bases."""
        return self.weights + self.optimizer_states + self.projection_bases

    def table(self) -> str:
        """A fixed-width breakdown (GiB and MiB) for terminals and Markdown code blocks."""
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("projection bases", self.projection_bases),
            ("activations", self.activations),
            ("logits / loss", self.logits),
            ("step / refresh transient", self.transient),
            ("peak", self.peak),
        ]
        lines = []
        if self.model is not None and self.setup is not None:
            m, s = self.model, self.setup
            lines.append(
                f"model: {m.num_parameters() / 1e6:.1f}M params (L={m.num_layers}, h={m.hidden_size}, "
                f"f={m.intermediate_size}, V={m.vocab_size}); step: {s.optimizer}"
                + (f" rank {s.rank}" if s.rank else "")
                + f", {s.dtype}, batch {s.batch_size} x {s.seq_len}"
                + (f", INT{s.weight_bits} weights" if s.weight_bits else "")
                + (f", INT{s.proj_bits} basis" if s.proj_bits else "")
                + (", layer-wise" if s.layerwise else "")
                + (", checkpointing" if s.activation_checkpointing else "")
                + (", chunked loss" if s.chunked_loss else "")
            )
        lines.append(f"{'component':<26}{'GiB':>10}{'MiB':>12}")
        for name, value in rows:
            if name == "peak":
                lines.append("-" * 48)
            lines.append(f"{name:<26}{value / GIB:>10.3f}{value / 2**20:>12.1f}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, int]:
        """The components in bytes (for JSON output and plots)."""
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "projection_bases": self.projection_bases,
            "activations": self.activations,
            "logits": self.logits,
            "transient": self.transient,
            "peak": self.peak,
        }


# ----- pure byte counts -------------------------------------------------------------------------------------------
def quantized_bytes(numel: int, bits: int, group_size: int) -> int:
    """Codes (INT8: one byte, INT4: half a byte, last group zero-padded) plus one fp32 scale per group."""
    groups = -(-numel // group_size)
    return groups * group_size * bits // 8 + groups * 4


def adam_state_bytes(numel: int, dtype_bytes: int, moment_bits: int) -> int:
    """Two moments of ``numel`` values: torch AdamW (param dtype, + fp32 step), bitsandbytes 8-bit, or 4-bit.

    The 4-bit case is torchao's ``AdamW4bit`` (``QGaLoreAdamW4bit``): packed codes, one fp32 scale per 128 values;
    like bitsandbytes it keeps tensors under 4096 values in 32 bits.
    """
    if moment_bits == 32:
        return 2 * numel * dtype_bytes + 4
    if numel < _BNB_MIN_8BIT:  # bitsandbytes keeps small tensors in 32 bits
        return 2 * numel * 4
    if moment_bits == 8:
        return 2 * (numel + -(-numel // _BNB_BLOCK) * 4)
    return 2 * (-(-numel // 2) + -(-numel // 128) * 4)


def block_activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """Bytes one ``LlamaDecoderLayer`` saves for backward (SDPA attention, no checkpointing).

    RMSNorm saves its fp32 input (4), the normalised value and the output (dtype each) plus a (tokens, 1) rsqrt;
    attention saves q and the output (h wide), k and v (kv wide), and a fp32 log-sum-exp per head; the MLP saves
    gate, SiLU(gate), up and their product (f wide). The q/k/v/o/gate/up/down inputs are these same tensors.
    """
    h, f, kv, heads = shape.hidden_size, shape.intermediate_size, shape.kv_size, shape.num_heads
    norms = 2 * (tokens * h * (4 + 2 * dtype_bytes) + tokens * 4)
    attention = tokens * dtype_bytes * (2 * h + 2 * kv) + tokens * heads * 4
    mlp = 4 * tokens * f * dtype_bytes
    return norms + attention + mlp


def activation_bytes(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int]:
    """(bytes saved by the model body during forward, bytes of one block recomputed in backward).

    The body is the embedding (int64 ids), the blocks (or their inputs under checkpointing), RoPE's cos/sin,
    and the final norm (fp32 input, normalised value, output: the output is what the LM head / loss saves).
    """
    tokens, dtype_bytes = setup.tokens, setup.dtype_bytes
    block = block_activation_bytes(shape, tokens, dtype_bytes)
    final_norm = tokens * shape.hidden_size * (4 + 2 * dtype_bytes) + tokens * 4
    ids = tokens * 8
    if setup.activation_checkpointing:
        return ids + shape.num_layers * tokens * shape.hidden_size * dtype_bytes + final_norm, block
    rope = 2 * setup.seq_len * shape.head_dim * dtype_bytes
    return ids + shape.num_layers * block + rope + final_norm, 0


def loss_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Peak bytes of the cross-entropy over the LM head (beyond the saved final hidden state).

    Unchunked: log_softmax's fp32 output, the incoming gradient and the gradient of the logits (three fp32
    tokens x vocab tensors at the start of backward). Chunked: two fp32 chunks of ``loss_chunk_size`` x vocab,
    the fp32 gradient of the hidden states and the per-token log-sum-exp.
    """
    tokens, vocab = setup.tokens, shape.vocab_size
    if not setup.chunked_loss:
        return 3 * tokens * vocab * 4
    chunk = min(setup.loss_chunk_size, tokens)
    return 2 * chunk * vocab * 4 + tokens * shape.hidden_size * 4 + tokens * 4


def estimate_memory(model_config: Any, train_config: Any) -> MemoryEstimate:
    """Predicts the memory of one training step.

    Args:
        model_config: a ``transformers.LlamaConfig``, a :class:`ModelShape`, or a dict / dataclass with LLaMA keys
            (``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads``, optional ``num_key_value_heads``, ``tie_word_embeddings``; short aliases such
            as ``layers``, ``heads``, ``kv_heads``, ``tied`` work too).
        train_config: a :class:`TrainingSetup`, or a dict / dataclass with its field names (``batch_size``,
            ``seq_len``, ``dtype``, ``optimizer``, ``rank``, ``proj_bits``, ``weight_bits``, ``layerwise``,
            ``activation_checkpointing``, ``chunked_loss``, ...); other keys are ignored.

    Returns:
        A :class:`MemoryEstimate`; ``print(estimate.table())`` shows the breakdown.

    Raises:
        ValueError: for an invalid config, or a rank not below a projected weight's smaller side.
    """
    shape = ModelShape.from_config(model_config)
    setup = TrainingSetup.from_config(train_config)
    dtype_bytes = setup.dtype_bytes
    h, vocab, layers = shape.hidden_size, shape.vocab_size, shape.num_layers
    method = setup.method
    lowrank = method.lowrank
    # bitsandbytes' blockwise 8-bit states (code maps, 32-bit small tensors, fp32 temporaries on the CPU).
    eight_bit = method.moment_bits == 8
    moment_bits = setup.moment_bits or method.moment_bits
    if lowrank:
        for m, n in shape.block_linear_shapes():
            if setup.rank >= min(m, n):
                raise ValueError(f"rank {setup.rank} is not below min(m, n) = {min(m, n)} of a {m} x {n} block weight")

    details: dict[str, int] = {}
    # Plain parameters: embedding, head (unless tied), norms. Their states are always full-size.
    plain_shapes = [vocab * h] + ([] if shape.tie_embeddings else [vocab * h]) + [h] * (2 * layers + 1)
    details["embedding + head"] = sum(plain_shapes[: 1 if shape.tie_embeddings else 2]) * dtype_bytes
    details["norms"] = (2 * layers + 1) * h * dtype_bytes
    details["rope buffers"] = 2 * (shape.head_dim // 2) * dtype_bytes  # inv_freq and its copy, cast with the model
    linear_numels = [m * n for m, n in shape.block_linear_shapes()] * layers
    if setup.weight_bits is None:
        details["block linears"] = sum(linear_numels) * dtype_bytes
    else:
        # Codes + scales, and the carrier Parameter's single element (QuantLinear).
        details["block linears"] = sum(
            quantized_bytes(n, setup.weight_bits, setup.weight_group_size) + dtype_bytes for n in linear_numels
        )
    weights = sum(details[k] for k in ("embedding + head", "norms", "rope buffers", "block linears"))

    # Optimizer states.
    # 4-bit moments come from one inner optimizer (torchao's AdamW4bit) for both groups.
    plain_moment_bits = 4 if setup.moment_bits == 4 else method.moment_bits
    states_plain = sum(adam_state_bytes(n, dtype_bytes, plain_moment_bits) for n in plain_shapes)
    bases = 0
    if lowrank:
        rank = setup.rank
        # Five int64 counters; adaptive refresh adds its fp32 similarity history (refresh_history = 5).
        per_weight_counters = 5 * 8 + (5 * 4 if setup.adaptive_refresh else 0)
        states_linear = 0
        for m, n in shape.block_linear_shapes():
            states_linear += adam_state_bytes(rank * max(m, n), dtype_bytes, moment_bits) + per_weight_counters
            if setup.projector != "random":
                basis = min(m, n) * rank
                bases += (
                    basis * 4
                    if setup.proj_bits is None
                    else quantized_bytes(basis, setup.proj_bits, setup.proj_group_size)
                )
        states_linear *= layers
        bases *= layers
    else:
        states_linear = sum(adam_state_bytes(n, dtype_bytes, moment_bits) for n in linear_numels)
    details["states: embedding/head/norms"] = states_plain
    details["states: block linears"] = states_linear
    # bitsandbytes' two code maps exist once per optimizer: once in all, or once per parameter in layer-wise mode.
    if eight_bit:
        state_numels = plain_shapes + (
            [setup.rank * max(m, n) for m, n in shape.block_linear_shapes()] * layers if lowrank else linear_numels
        )
        eight_bit_tensors = sum(n >= _BNB_MIN_8BIT for n in state_numels)
        details["states: 8-bit code maps"] = _QMAP_BYTES * (eight_bit_tensors if setup.layerwise else 1)
        states_plain += details["states: 8-bit code maps"]
    optimizer_states = states_plain + states_linear

    # Gradients: in the parameter dtype (a quantized weight's gradient too).
    all_numels = plain_shapes + linear_numels
    largest_grad = max(all_numels) * dtype_bytes
    accumulators = 0
    if setup.accumulation_steps > 1:
        if lowrank:  # projected accumulators for low-rank weights, full ones for the rest
            accumulators = layers * sum(setup.rank * max(m, n) for m, n in shape.block_linear_shapes()) * dtype_bytes
            accumulators += sum(plain_shapes) * dtype_bytes if setup.layerwise else 0
        elif setup.layerwise:
            accumulators = sum(all_numels) * dtype_bytes
    all_grads = sum(all_numels) * dtype_bytes
    if setup.layerwise:
        gradients = largest_grad + accumulators
    elif lowrank and setup.accumulation_steps > 1:
        gradients = all_grads + accumulators
    else:
        gradients = all_grads

    activations, recompute = activation_bytes(shape, setup)
    logits = loss_bytes(shape, setup)

    # Transients of the optimizer step (largest weight) and of a basis refresh.
    big_m, big_n = max(shape.block_linear_shapes(), key=lambda s: s[0] * s[1])
    big = big_m * big_n
    if lowrank:
        step_tmp = big * dtype_bytes  # the projected-back full update
        if setup.weight_bits is not None:  # fp32 dequantized weight + fp32 scaled update + new codes
            step_tmp += big * (4 + 4 + 1)
        low, high = min(big_m, big_n), max(big_m, big_n)
        cast = big * 4 if dtype_bytes != 4 else 0
        if setup.projector == "svd":
            refresh_tmp = cast + 4 * (low * low + low * high + low)
        elif setup.projector == "rsvd":
            width = setup.rank + setup.oversample
            refresh_tmp = cast + 4 * (2 * high * width + 2 * width * width)
        else:
            refresh_tmp = low * setup.rank * 4
        transient = max(step_tmp, refresh_tmp)
    else:
        # torch's single-tensor AdamW: one temporary of the largest parameter.
        transient = max(all_numels) * (4 if eight_bit else dtype_bytes)
    if eight_bit and setup.device == "cpu":
        largest_8bit = max(n for n in state_numels if n >= _BNB_MIN_8BIT)
        transient = max(transient, _BNB_CPU_TEMP_BYTES * largest_8bit)
    details["transient: step"] = transient

    static = weights + optimizer_states + bases
    head_grad = vocab * h * dtype_bytes
    start_of_backward = activations + logits + (head_grad if not setup.layerwise else largest_grad)
    if setup.layerwise:
        # Steps happen inside backward: a transient can meet the activations still alive.
        start_of_backward += transient + accumulators
        end_of_backward = recompute + gradients + transient
        step = 0
    else:
        end_of_backward = gradients + recompute + (activations if setup.activation_checkpointing else 0)
        step = gradients + transient
    details["moment: start of backward"] = start_of_backward
    details["moment: end of backward"] = end_of_backward
    details["moment: optimizer step"] = step
    peak = static + max(start_of_backward, end_of_backward, step)
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_states=optimizer_states,
        projection_bases=bases,
        activations=activations,
        logits=logits,
        transient=transient,
        peak=peak,
        details=details,
        model=shape,
        setup=setup,
    )


def llama_shape(name: str) -> ModelShape:
    """Shapes of the LLaMA sizes used by GaLore / Q-GaLore ("20m", "60m", "130m", "350m", "1b", "7b").

    The small ones follow GaLore's pretraining configs (vocab 32000, intermediate ~ 8/3 h rounded).
    """
    table = {
        "20m": (32000, 256, 688, 4, 4),
        "60m": (32000, 512, 1376, 8, 8),
        "130m": (32000, 768, 2048, 12, 12),
        "350m": (32000, 1024, 2736, 24, 16),
        "1b": (32000, 2048, 5461, 24, 32),
        "7b": (32000, 4096, 11008, 32, 32),
    }
    try:
        vocab, hidden, inter, layers, heads = table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown LLaMA size {name!r}; expected one of {sorted(table)}") from None
    return ModelShape(vocab, hidden, inter, layers, heads)


def format_bytes(num_bytes: float) -> str:
    """Human-readable size: ``1.50 GiB``, ``12.0 MiB``."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit}" if unit == "GiB" else f"{num_bytes / size:.1f} {unit}"
    return f"{int(num_bytes)} B"


# ----- measurement (what the estimate is checked against) ---------------------------------------------------------
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


def __getattr__(name: str) -> Any:
    # The estimator's optimizer names are the registry's; OPTIMIZERS stays importable, always current.
    if name == "OPTIMIZERS":
        return optimizer_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GIB",
    "MemoryEstimate",
    "PeakTensorBytes",
    "SavedTensorBytes",
    "ModelShape",
    "TrainingSetup",
    "activation_bytes",
    "adam_state_bytes",
    "block_activation_bytes",
    "estimate_memory",
    "format_bytes",
    "llama_shape",
    "loss_bytes",
    "measure_live_bytes",
    "measure_peak",
    "quantized_bytes",
]
