"""The memory estimator's two inputs: the shape of a LLaMA-style model and the setup of a training step.

Both accept what users already have (a ``LlamaConfig``, a dict with Hugging Face or short key names, a dataclass)
and are validated where they enter; the optimizer's facts (GaLore family, moment bits, Q-GaLore's defaults) come
from its entry in the optimizer registry (:mod:`lowrank_train.optim.registry`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lowrank_train.optim.options import GALORE_DEFAULTS
from lowrank_train.optim.registry import OptimizerMethod, get_optimizer_method, optimizer_names
from lowrank_train.projection import ProjectorKind, get_projector
from lowrank_train.quant import BASIS_BITS, DEFAULT_GROUP_SIZE, MOMENT_BITS, WEIGHT_BITS, check_bits

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
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
    "world_size": ("world_size", "nproc"),
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
        projector: a registered projector (:func:`lowrank_train.projection.get_projector`); its entry says whether
            a basis is stored, its rank (full for "identity") and its refresh workspace.
        proj_bits: basis storage: None (the method's default: fp32, or 4 for Q-GaLore), 8 or 4 (packed).
        proj_group_size: elements per basis quantization group.
        weight_bits: None (the method's default: float weights, or 8 for Q-GaLore) or 8/4 for the block linear
            layers.
        weight_group_size: elements per weight quantization group.
        adaptive_refresh: layer-adaptive refresh keeps a similarity history per weight (None: the method's
            default).
        moment_bits: overrides the width of the projected (GaLore) or full moments: 32, 8 or 4 (4: the plain
            group's too, as with ``QGaLoreAdamW4bit``). None: the method's own.
        dense_state_bits: moments of the parameters that are not projected (embedding, head, norms) from their
            own optimizer (:mod:`lowrank_train.optim.dense_states`): 32, 8 (bitsandbytes) or 4 (torchao); None:
            the method's inner optimizer holds them (GaLore kinds only).
        layerwise: parameters are stepped inside backward and their gradients freed at once (issue 4).
        activation_checkpointing: only block inputs are kept; one block is recomputed during its backward.
        chunked_loss: cross-entropy by chunks (:func:`lowrank_train.nn.chunked_cross_entropy`).
        loss_chunk_size: tokens per chunk of the chunked loss.
        accumulation_steps: micro-batches per step; > 1 keeps gradient accumulators (projected ones in GaLore).
        oversample: extra sketch columns of the "rsvd" projector.
        world_size: data-parallel ranks under FSDP2 (``estimate --nproc N``): the estimate is one rank's, with
            weights, gradients and most optimizer states divided and activations not
            (:func:`lowrank_train.memory.estimate._fsdp2_per_rank`); 1: one process.
        device: "cuda" or "cpu"; on "cpu" bitsandbytes' 8-bit optimizer step runs through fp32 temporaries of the
            whole tensor (measured ~24 bytes per element), which becomes the largest transient.
    """

    batch_size: int = 1
    seq_len: int = 256
    dtype: str = "bfloat16"
    optimizer: str = "adamw"
    rank: int | None = None
    projector: str = GALORE_DEFAULTS["projector"]
    proj_bits: int | None = None
    proj_group_size: int = GALORE_DEFAULTS["proj_group_size"]
    weight_bits: int | None = None
    weight_group_size: int = DEFAULT_GROUP_SIZE
    adaptive_refresh: bool | None = None
    moment_bits: int | None = None
    dense_state_bits: int | None = None
    layerwise: bool = False
    activation_checkpointing: bool = False
    chunked_loss: bool = False
    loss_chunk_size: int = 1024
    accumulation_steps: int = 1
    oversample: int = GALORE_DEFAULTS["oversample"]
    world_size: int = 1
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        for name in ("batch_size", "seq_len", "proj_group_size", "weight_group_size", "loss_chunk_size", "world_size"):
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
        # Options the method fixes (APOLLO-Mini: rank 1, the random projector): its builder writes them in the groups.
        for name in ("projector", "rank"):
            if name in method.method_options:
                object.__setattr__(self, name, method.method_options[name])
        if method.lowrank:
            if self.rank is None or isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
                raise ValueError(f"optimizer {optimizer!r} projects gradients: rank must be a positive integer")
            get_projector(self.projector)  # any registered kind; its entry says what it stores and costs
        # The method's defaults (Q-GaLore, arXiv 2407.08296: INT4 basis, INT8 weights, adaptive refresh).
        for name in ("proj_bits", "weight_bits", "adaptive_refresh"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(method, name))
        for name, allowed in (
            ("proj_bits", BASIS_BITS),
            ("weight_bits", WEIGHT_BITS),
            ("moment_bits", MOMENT_BITS),
            ("dense_state_bits", MOMENT_BITS),
        ):
            object.__setattr__(self, name, check_bits(getattr(self, name), allowed, name=name))
        if self.dense_state_bits is not None and not method.lowrank:
            raise ValueError(
                f"dense_state_bits={self.dense_state_bits} needs a GaLore-family optimizer (its projected groups "
                f"apart); {optimizer!r} holds every parameter's moments itself"
            )
        if self.weight_bits is not None and not method.lowrank:
            family = ", ".join(optimizer_names(lowrank=True))
            raise ValueError(
                f"weight_bits={self.weight_bits} needs a GaLore optimizer ({family}): only its stochastic-rounding "
                f"write-back can update quantized weights, not {optimizer!r}"
            )

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
    def projector_kind(self) -> ProjectorKind:
        """The projector's registry entry."""
        return get_projector(self.projector)

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


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
