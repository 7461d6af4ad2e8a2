import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


@pytest.fixture
def tiny_llama():
    """A 2-layer LLaMA with random weights (vocab 256, hidden 64): fast on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


# The device-sensitive tests run on every device: `pytest -m cuda` selects their CUDA cases on a GPU machine; on a
# CPU-only machine those cases are collected and skipped with a reason, so the summary shows how many (issue 13).
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device-sensitive test once per device: ``cpu``, and ``cuda`` (marked ``cuda``, skipped without one)."""
    return torch.device(request.param)
