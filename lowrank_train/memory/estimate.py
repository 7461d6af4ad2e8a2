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

from dataclasses import dataclass, field
from typing import Any

from lowrank_train.memory.config import ModelShape, TrainingSetup
from lowrank_train.optim.options import GALORE_DEFAULTS
from lowrank_train.optim.update_rules import get_update_rule

# bitsandbytes' blockwise 8-bit optimizers: one fp32 absmax per 256 values, two 256-entry fp32 code maps per
# optimizer (shared by its parameters), and 32-bit states for tensors under 4096 elements (its ``min_8bit_size``).
_BNB_BLOCK = 256
_BNB_MIN_8BIT = 4096
_QMAP_BYTES = 2 * 256 * 4
_TORCHAO_QMAP_BYTES = 16 * 4
# Counters beside the moments: GaLore's skipped_steps and DenseSplitOptimizer's (int64 each), the layer-wise
# engine's steps / skipped_steps / skipped_updates (int64) and last_grad_norm (fp32); torchao's low-bit optimizers
# keep lr as an fp32 tensor in their param groups.
_GALORE_COUNTER_BYTES = 8
_SPLIT_COUNTER_BYTES = 8
_LAYERWISE_COUNTER_BYTES = 3 * 8 + 4
_TORCHAO_LR_BYTES = 4
# bitsandbytes' CPU 8-bit step dequantizes moments, gradient and parameter to fp32 for the whole tensor: measured
# ~26 bytes per element of process peak on the first step (2 of them the 8-bit moments), see llama7b_memory.md.
# torchao's 4-bit AdamW step on the CPU grows the peak about as much (~27 bytes per element, 1 of them its states).
_BNB_CPU_TEMP_BYTES = 24
GIB = 1024**3


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
        communication: per rank under FSDP2 (``world_size`` > 1), the unsharded parameters and gradients it
            all-gathers / reduce-scatters (see :func:`_fsdp2_per_rank`); 0 in one process. Shown in the table
            and in :meth:`as_dict` only when non-zero.
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
    communication: int = 0
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
            *([("FSDP2 unsharded buffers", self.communication)] if self.communication else []),
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
                + (f", {s.dense_state_bits}-bit dense moments" if s.dense_state_bits else "")
                + (", layer-wise" if s.layerwise else "")
                + (", checkpointing" if s.activation_checkpointing else "")
                + (", chunked loss" if s.chunked_loss else "")
                + (f"; per rank of {s.world_size} (FSDP2)" if s.world_size > 1 else "")
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
            **({"communication": self.communication} if self.communication else {}),
            "peak": self.peak,
        }


# ----- pure byte counts -------------------------------------------------------------------------------------------
def quantized_bytes(numel: int, bits: int, group_size: int) -> int:
    """Codes (INT8: one byte, INT4: half a byte, last group zero-padded) plus one fp32 scale per group."""
    groups = -(-numel // group_size)
    return groups * group_size * bits // 8 + groups * 4


def adam_state_bytes(numel: int, dtype_bytes: int, moment_bits: int) -> int:
    """Two moments of ``numel`` values: torch AdamW (param dtype, + fp32 step), bitsandbytes 8-bit, or 4-bit.

    The 4-bit case is torchao's ``AdamW4bit`` (``QGaLoreAdamW4bit``): packed codes, one fp32 scale per 128 values
    and a 16-entry fp32 code map per moment, an fp32 step; it keeps tensors under 4096 values in the parameter dtype
    (bitsandbytes keeps them in fp32).
    """
    if moment_bits == 32:
        return 2 * numel * dtype_bytes + 4
    if moment_bits == 4:
        if numel < _BNB_MIN_8BIT:
            return 2 * numel * dtype_bytes + 4
        return 2 * (-(-numel // 2) + -(-numel // 128) * 4 + _TORCHAO_QMAP_BYTES) + 4
    if numel < _BNB_MIN_8BIT:  # bitsandbytes keeps small tensors in 32 bits
        return 2 * numel * 4
    return 2 * (numel + -(-numel // _BNB_BLOCK) * 4)


def _step_bytes(moment_bits: int) -> int:
    """The 0-d fp32 ``step`` torch's AdamW and torchao keep per parameter (bitsandbytes keeps a Python int)."""
    return 0 if moment_bits == 8 else 4


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
    # Blockwise-quantized states (bitsandbytes' 8-bit, torchao's 4-bit): code maps, 32-bit small tensors and whole-
    # tensor fp32 temporaries of the step on the CPU.
    eight_bit = method.moment_bits < 32
    moment_bits = setup.moment_bits or method.moment_bits
    kind = setup.projector_kind
    rule = get_update_rule(method.method_options.get("update", GALORE_DEFAULTS["update"]))
    # APOLLO / Fira read the raw gradient at the step: micro-batches accumulate in .grad, not projected.
    projected_accumulation = lowrank and not rule.needs_full_gradient
    # Basis columns per block weight: the setup's rank, or min(m, n) for a full-rank projector (identity).
    ranks = [kind.basis_rank((m, n), setup.rank) for m, n in shape.block_linear_shapes()] if lowrank else []
    if lowrank and not kind.full_rank:
        for m, n in shape.block_linear_shapes():
            if setup.rank >= min(m, n):
                raise ValueError(f"rank {setup.rank} is not below min(m, n) = {min(m, n)} of a {m} x {n} block weight")

    details: dict[str, int] = {}
    # Plain parameters: embedding, head (unless tied), norms. Their states are always full-size.
    plain_shapes = [vocab * h] + ([] if shape.tie_embeddings else [vocab * h]) + [h] * (2 * layers + 1)
    details["embedding + head"] = sum(plain_shapes[: 1 if shape.tie_embeddings else 2]) * dtype_bytes
    details["norms"] = (2 * layers + 1) * h * dtype_bytes
    # inv_freq and its copy: cast with a float model; a model built straight as INT8 from shapes (the run's
    # materialize_llama) keeps Hugging Face's fp32 ones.
    rope_bytes = 4 if setup.weight_bits is not None else dtype_bytes
    details["rope buffers"] = 2 * (shape.head_dim // 2) * rope_bytes
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
    # 4-bit moments come from one inner optimizer (torchao's AdamW4bit) for both groups, unless the dense groups
    # have their own (dense_state_bits: lowrank_train.optim.dense_states).
    split = setup.dense_state_bits is not None
    if split:
        plain_moment_bits = setup.dense_state_bits
    else:
        plain_moment_bits = 4 if setup.moment_bits == 4 else method.moment_bits
    states_plain = sum(adam_state_bytes(n, dtype_bytes, plain_moment_bits) for n in plain_shapes)
    if method.state_bytes is not None:  # the entry's own state layout (SCALE: the head's momentum only)
        roles = ["embedding"] + ([] if shape.tie_embeddings else ["head"]) + ["norm"] * (2 * layers + 1)
        states_plain = sum(method.state_bytes(r, n, dtype_bytes) for r, n in zip(roles, plain_shapes, strict=True))
    bases = 0
    replicated_linear_states = 0
    if lowrank:
        # Five int64 counters; adaptive refresh adds its fp32 similarity history (the schema's refresh_history).
        per_weight_counters = 5 * 8 + (GALORE_DEFAULTS["refresh_history"] * 4 if setup.adaptive_refresh else 0)
        # The norm-growth limiter's fp32 update_norm (APOLLO / Fira, lowrank_train.optim.update_rules).
        per_weight_counters += 4 if rule.growth_limit(method.method_options) is not None else 0
        states_linear = 0
        for (m, n), rank in zip(shape.block_linear_shapes(), ranks, strict=True):
            weight_states = adam_state_bytes(rank * max(m, n), dtype_bytes, moment_bits)
            states_linear += weight_states + per_weight_counters
            # Under FSDP2 (rows sharded) a basis on the row side (m <= n) makes R = P^T G an all-reduced r x n
            # matrix: its moments are the same on every rank; the counters are per rank anyway.
            replicated_linear_states += (weight_states if m <= n else 0) + per_weight_counters
            if kind.stores_basis:
                basis = min(m, n) * rank
                bases += (
                    basis * 4
                    if setup.proj_bits is None
                    else quantized_bytes(basis, setup.proj_bits, setup.proj_group_size)
                )
            elif not kind.full_rank:  # a seeded basis, kept in fp32 between refreshes (GaLore._seeded_bases)
                bases += min(m, n) * rank * 4
        states_linear *= layers
        replicated_linear_states *= layers
        bases *= layers
    elif method.state_bytes is not None:
        states_linear = sum(method.state_bytes("linear", n, dtype_bytes) for n in linear_numels)
    else:
        states_linear = sum(adam_state_bytes(n, dtype_bytes, moment_bits) for n in linear_numels)
    details["states: embedding/head/norms"] = states_plain
    details["states: block linears"] = states_linear
    # bitsandbytes' two code maps exist once per optimizer: once in all, or once per parameter in layer-wise mode.
    # With dense_state_bits the dense groups' optimizer is another one (its maps counted apart).
    linear_state_numels = (
        [r * max(m, n) for (m, n), r in zip(shape.block_linear_shapes(), ranks, strict=True)] * layers
        if lowrank
        else linear_numels
    )
    quantized_parts = []  # state numels of each blockwise-quantized optimizer
    if eight_bit:
        quantized_parts.append(linear_state_numels + ([] if split else plain_shapes))
    if split and plain_moment_bits == 8:
        quantized_parts.append(plain_shapes)
    state_numels = [n for part in quantized_parts for n in part]
    if quantized_parts:
        details["states: 8-bit code maps"] = sum(
            _QMAP_BYTES * (sum(n >= _BNB_MIN_8BIT for n in part) if setup.layerwise else 1) for part in quantized_parts
        )
        states_plain += details["states: 8-bit code maps"]
    if split and plain_moment_bits == 4:
        state_numels += plain_shapes  # torchao's CPU step: whole-tensor fp32 temporaries as bitsandbytes'
    # What FSDP2 shards (before code maps and counters): the moments, not their 0-d step tensors.
    steps = sum(_step_bytes(plain_moment_bits) for _ in plain_shapes)
    if lowrank:
        steps += layers * sum(_step_bytes(moment_bits) for m, n in shape.block_linear_shapes() if m > n)
    else:
        steps += len(linear_numels) * _step_bytes(moment_bits)
    sharded_states = states_plain + states_linear - replicated_linear_states - steps
    # Counters: how many optimizers hold them (one per parameter inside the layer-wise engine).
    num_plain, num_linear = len(plain_shapes), len(linear_numels)
    galore_optimizers = (num_linear + (0 if split else num_plain) if setup.layerwise else 1) if lowrank else 0
    torchao_optimizers = 0
    if moment_bits == 4:
        torchao_optimizers += (num_linear + (0 if split else num_plain)) if setup.layerwise else 1
    if split and plain_moment_bits == 4:
        # Layer-wise, the engine's group of the dense parameters hands all of them one lr tensor.
        torchao_optimizers += 1
    counters = galore_optimizers * _GALORE_COUNTER_BYTES + torchao_optimizers * _TORCHAO_LR_BYTES
    counters += _LAYERWISE_COUNTER_BYTES if setup.layerwise else (_SPLIT_COUNTER_BYTES if split else 0)
    details["states: counters"] = counters
    optimizer_states = states_plain + states_linear + counters

    # Gradients: in the parameter dtype (a quantized weight's gradient too).
    all_numels = plain_shapes + linear_numels
    largest_grad = max(all_numels) * dtype_bytes
    accumulators = 0
    if setup.accumulation_steps > 1:
        if projected_accumulation:  # projected accumulators for low-rank weights, full ones for the rest
            projected = sum(r * max(m, n) for (m, n), r in zip(shape.block_linear_shapes(), ranks, strict=True))
            accumulators = layers * projected * dtype_bytes
            accumulators += sum(plain_shapes) * dtype_bytes if setup.layerwise else 0
        elif setup.layerwise:
            accumulators = sum(all_numels) * dtype_bytes
    all_grads = sum(all_numels) * dtype_bytes
    if setup.layerwise:
        gradients = largest_grad + accumulators
    elif projected_accumulation and setup.accumulation_steps > 1:
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
        if rule.needs_full_gradient:  # an fp32 full update from an fp32 view of the gradient
            step_tmp = big * (4 + (4 if dtype_bytes != 4 else 0))
        if setup.weight_bits is not None:  # fp32 dequantized weight + fp32 scaled update + new codes
            step_tmp += big * (4 + 4 + 1)
        # The refresh: an fp32 copy of a low-precision gradient (when read) plus the kind's own workspace.
        cast = big * 4 if dtype_bytes != 4 and kind.uses_gradient else 0
        options = kind.build_options({**GALORE_DEFAULTS, "oversample": setup.oversample})
        refresh_tmp = cast + 4 * kind.workspace(big_m, big_n, kind.basis_rank((big_m, big_n), setup.rank), **options)
    else:
        # torch's single-tensor AdamW: one temporary of the largest parameter.
        step_tmp, refresh_tmp = max(all_numels) * (4 if eight_bit else dtype_bytes), 0
    cpu_tmp = 0
    if state_numels and setup.device == "cpu":
        cpu_tmp = _BNB_CPU_TEMP_BYTES * max((n for n in state_numels if n >= _BNB_MIN_8BIT), default=0)

    head_grad = vocab * h * dtype_bytes
    communication = 0
    world = setup.world_size
    if world > 1:
        weights, optimizer_states, gradients, largest_grad, head_grad, step_tmp, cpu_tmp, communication = (
            _fsdp2_per_rank(
                shape,
                setup,
                details,
                sharded_states=sharded_states,
                optimizer_states=optimizer_states,
                gradients=gradients - accumulators,
                accumulators=accumulators,
                largest_grad=largest_grad,
                head_grad=head_grad,
                step_tmp=step_tmp,
                full_gradient_step=rule.needs_full_gradient,
                cpu_tmp=cpu_tmp,
            )
        )
        details["fsdp2: unsharded buffers"] = communication
    transient = max(step_tmp, refresh_tmp, cpu_tmp)
    details["transient: step"] = transient

    static = weights + optimizer_states + bases
    start_of_backward = activations + logits + (head_grad if not setup.layerwise else largest_grad)
    if setup.layerwise:
        # Steps happen inside backward: a transient can meet the activations still alive.
        start_of_backward += transient + accumulators
        end_of_backward = recompute + gradients + transient
        step = 0
    else:
        end_of_backward = gradients + recompute + (activations if setup.activation_checkpointing else 0)
        # Between refreshes the step's NaN/Inf check forms every low-rank weight's projection R = P^T G, and each
        # lives until its weight is updated (not divided under FSDP2: the row-side R is all-reduced whole).
        projections = 0
        if lowrank:
            projected = sum(r * max(m, n) for (m, n), r in zip(shape.block_linear_shapes(), ranks, strict=True))
            projections = layers * projected * dtype_bytes
            details["step: projected gradients"] = projections
        step = gradients + transient + projections
    # FSDP2's unsharded parameters and gradients exist during forward and backward, not at the step.
    start_of_backward += communication
    end_of_backward += communication
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
        communication=communication,
        details=details,
        model=shape,
        setup=setup,
    )


FSDP2_REPLICATED = (
    "activations and logits (each rank's own micro-batch)",
    "projection bases (every rank builds the full basis)",
    "projected moments of the weights with m <= n (basis on the sharded row side: R = P^T G is all-reduced, "
    "r x n on every rank)",
    "a basis refresh's all-gathered full gradient and its workspace",
    "APOLLO-type updates: the full gradient they scale",
    "optimizer counters and bitsandbytes' code maps",
    "the rotary buffers",
)
"""What :func:`estimate_memory` keeps whole on every rank under FSDP2 (``world_size`` > 1)."""


def _fsdp2_per_rank(
    shape: ModelShape,
    setup: TrainingSetup,
    details: dict[str, int],
    *,
    sharded_states: int,
    optimizer_states: int,
    gradients: int,
    accumulators: int,
    largest_grad: int,
    head_grad: int,
    step_tmp: int,
    full_gradient_step: bool,
    cpu_tmp: int,
) -> tuple[int, int, int, int, int, int, int, int]:
    """One rank's share under FSDP2 over ``setup.world_size`` ranks (``fully_shard`` per block and on the root).

    Divided (rows sharded on dim 0, ``ceil(bytes / N)``): the weights (INT8 codes and scales like float weights),
    the gradients (reduce-scattered), the dense moments and the projected moments on the unsharded column side
    (m > n), the step's projected-back update (not an APOLLO-type one, which scales the full gradient) and the
    CPU 8-bit step's temporaries (local rows). Kept whole: see
    :data:`FSDP2_REPLICATED`. Added: FSDP2's unsharded buffers during forward and backward -- the root's embedding,
    head and final norm (the root is not resharded after forward), two blocks' parameters (the current one and the
    prefetched next), one block's unsharded gradients before their reduce-scatter and the root's (the embedding's
    gradient is the last one, so the head's waits for it).

    Returns:
        (weights, optimizer states, gradients, largest gradient, head gradient, step temporary, CPU step
        temporary, unsharded buffers) in bytes, per rank.
    """
    world = setup.world_size

    def shard(nbytes: int) -> int:
        return -(-nbytes // world)

    h, dtype_bytes, layers = shape.hidden_size, setup.dtype_bytes, shape.num_layers
    weights = shard(details["embedding + head"] + details["norms"] + details["block linears"])
    weights += details["rope buffers"]
    states = shard(sharded_states) + optimizer_states - sharded_states
    if setup.layerwise:
        grads = shard(largest_grad) + accumulators
    else:
        grads = shard(gradients) + accumulators
    block_numel = sum(m * n for m, n in shape.block_linear_shapes()) + 2 * h
    block_params = details["block linears"] // layers + 2 * h * dtype_bytes
    root_params = details["embedding + head"] + h * dtype_bytes
    root_grads = details["embedding + head"]  # gradients in the parameter dtype
    communication = root_params + 2 * block_params + block_numel * dtype_bytes + root_grads
    return (
        weights,
        states,
        grads,
        shard(largest_grad),
        shard(head_grad),
        step_tmp if full_gradient_step else shard(step_tmp),
        shard(cpu_tmp),
        communication,
    )


def format_bytes(num_bytes: float) -> str:
    """Human-readable size: ``1.50 GiB``, ``12.0 MiB``."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit}" if unit == "GiB" else f"{num_bytes / size:.1f} {unit}"
    return f"{int(num_bytes)} B"
