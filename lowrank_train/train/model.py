"""Models for recipes: a LLaMA built from config shapes, or a pretrained / WeLore-compressed one from a path."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lowrank_train.train.config import ModelConfig

SMOLLM2_OFFLINE = "smollm2-offline"
GEMMA3_OFFLINE = "gemma3-offline"
WELORE_MARKER = "welore.json"


def llama_config(config: ModelConfig) -> LlamaConfig:
    """The ``transformers`` config of a LLaMA with the shapes of ``config``."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads or config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        use_cache=False,
    )


def build_model(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    *,
    weight_bits: int | None = None,
    weight_group_size: int = 256,
    seed: int = 0,
) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """The model a run trains, and the tokenizer that came with it (``None`` for a model built from shapes).

    Args:
        config: shapes, or ``pretrained`` (a folder, a hub id, ``smollm2-offline``, ``gemma3-offline``,
            or a WeLore folder).
        dtype: parameter dtype.
        weight_bits: for a model built from shapes, build its block linears straight as INT8 (or INT4)
            ``QuantLinear`` layers on the meta device, layer by layer, so the full-precision model never exists
            (a 7B model would need 27 GB of fp32 host memory otherwise). Pretrained models are quantized later.
        weight_group_size: quantization group size with ``weight_bits``.
        seed: weight initialisation seed with ``weight_bits``.

    Raises:
        FileNotFoundError: a pretrained path that does not exist.
    """
    if config.pretrained is None:
        if weight_bits is not None:
            from lowrank_train.nn import materialize_llama

            model = materialize_llama(
                llama_config(config),
                dtype=dtype,
                weight_bits=weight_bits,
                weight_group_size=weight_group_size,
                seed=seed,
            )
            return model, None
        model = LlamaForCausalLM(llama_config(config))
        return model.to(dtype), None
    if config.pretrained == SMOLLM2_OFFLINE:
        from lowrank_train.pretrained import smollm2_offline

        model, tokenizer = smollm2_offline(dtype=dtype)
        return model, tokenizer
    if config.pretrained == GEMMA3_OFFLINE:
        from lowrank_train.pretrained import gemma3_offline

        return gemma3_offline(dtype=dtype)
    path = Path(config.pretrained).expanduser()
    if (path / WELORE_MARKER).is_file():
        from lowrank_train.welore import load_compressed

        model = load_compressed(path).to(dtype)
        model.train()
        return model, _tokenizer_in(path)
    from lowrank_train.pretrained import load_causal_lm

    model = load_causal_lm(config.pretrained, dtype=dtype)
    return model, _tokenizer_in(path) if path.is_dir() else _hub_tokenizer(config.pretrained)


def _tokenizer_in(folder: Path) -> PreTrainedTokenizerBase | None:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _hub_tokenizer(name: str) -> PreTrainedTokenizerBase | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError:
        return None


def count_parameters(model: nn.Module) -> int:
    """Distinct parameter elements (tied weights once)."""
    return sum(p.numel() for p in model.parameters())
