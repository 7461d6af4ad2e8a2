import pytest
import torch


def build_llama(**overrides):
    """A 2-layer LLaMA with grouped-query attention and tied embeddings (like SmolLM2), random weights (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama_builder():
    """:func:`build_llama`, for tests that need the same model with other config values."""
    return build_llama


@pytest.fixture
def llama():
    """A 2-layer LLaMA with grouped-query attention and tied embeddings (like SmolLM2), random weights."""
    return build_llama()


@pytest.fixture
def calibration():
    """24 sequences of 32 token ids for the 128-token vocabulary above."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (24, 32), generator=generator)
