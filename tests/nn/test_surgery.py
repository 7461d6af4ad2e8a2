"""nn.surgery: blocks, target_modules (one meaning for every consumer) and replace_module, against hand-written
expectations on small models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowrank_train.nn import QuantLinear, materialize_llama, quantize_model, surgery
from lowrank_train.nn.surgery import (
    block_modules,
    find_blocks,
    find_target_modules,
    is_dense_linear,
    is_linear,
    output_layer_names,
    register_linear_type,
    replace_module,
)
from lowrank_train.optim import lowrank_param_groups
from lowrank_train.welore import find_block_linears

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCK_LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in ATTENTION + MLP]


def llama(tied: bool = False) -> LlamaForCausalLM:
    """A fresh 2-layer LLaMA with grouped-query attention, its head tied to the embedding or not."""
    torch.manual_seed(0)
    shapes = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    return LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=tied, **shapes)
    )


class Expert(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.experts = nn.ModuleList(Expert(width) for _ in range(2))  # a list nested inside a block


class Custom(nn.Module):
    """No Hugging Face methods: the head is found by structure (projects onto the vocabulary)."""

    def __init__(self, vocab: int = 40, width: int = 8) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.stack = nn.ModuleList(Block(width) for _ in range(2))
        self.readouts = nn.ModuleList([nn.Linear(width, 3)])  # a list of leaf layers holds no blocks
        self.out = nn.Linear(width, vocab, bias=False)


def test_llama_blocks_and_block_linears():
    model = llama()
    blocks = find_blocks(model)
    assert list(blocks) == ["model.layers.0", "model.layers.1"]
    assert blocks["model.layers.1"] is model.model.layers[1]
    assert list(block_modules(model)) == BLOCK_LINEARS
    assert output_layer_names(model) == {"lm_head"}
    assert list(find_target_modules(model, None)) == BLOCK_LINEARS
    assert list(find_target_modules(model, "all-linear")) == BLOCK_LINEARS  # everything but lm_head


def test_tied_head_left_out_by_default_but_selected_when_named():
    model = llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert output_layer_names(model) == {"lm_head"}
    assert "lm_head" not in find_target_modules(model, "all-linear")
    assert list(find_target_modules(model, ["lm_head"])) == ["lm_head"]  # an explicit name is honoured
    assert list(find_target_modules(model, r"lm_h.*")) == ["lm_head"]


@pytest.mark.parametrize(
    "target_modules,expected",
    [
        # A string is a regular expression that must match the WHOLE qualified name.
        ("q_proj", []),
        (r".*\.q_proj", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (r"model\.layers\.0\..*", BLOCK_LINEARS[:7]),
        (r".*(up|down)_proj", [n for n in BLOCK_LINEARS if n.endswith(("up_proj", "down_proj"))]),
        # A list entry is an exact qualified name or a dotted suffix of one.
        (["q_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (["self_attn.q_proj", "mlp.up_proj"], [n for n in BLOCK_LINEARS if n.endswith(("q_proj", "up_proj"))]),
        (["_proj"], []),  # not a dotted suffix
        (["proj"], []),
        (["layers.1.mlp.down_proj"], ["model.layers.1.mlp.down_proj"]),
        (("model.layers.0.self_attn.o_proj",), ["model.layers.0.self_attn.o_proj"]),
        (["model.layers.0"], []),  # a block is not a linear layer
    ],
)
def test_regex_and_list_semantics(target_modules, expected):
    assert list(find_target_modules(llama(), target_modules)) == expected


def test_custom_module_structure():
    model = Custom()
    assert list(find_blocks(model)) == ["stack.0", "stack.1"]  # not the nested experts, not `readouts`
    per_block = ["mix", "experts.0.up", "experts.0.down", "experts.1.up", "experts.1.down"]
    expected = [f"stack.{i}.{name}" for i in range(2) for name in per_block]
    assert list(block_modules(model)) == expected
    assert output_layer_names(model) == {"out"}  # outside the blocks, out_features == vocabulary
    assert list(find_target_modules(model, "all-linear")) == [*expected, "readouts.0"]
    model.out.weight = model.tokens.weight  # tied by hand
    assert output_layer_names(model) == {"out"}


def test_model_without_blocks_falls_back_to_all_linear():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 10))
    assert find_blocks(model) == {}
    assert block_modules(model) == {}
    assert list(find_target_modules(model, None)) == ["1"]  # "3" projects onto the vocabulary: the head


def test_exact_linear_type_for_conversions():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
    out_proj = encoder.layers[0].self_attn.out_proj  # a Linear subclass MultiheadAttention reads directly
    assert is_linear(out_proj) and not is_dense_linear(out_proj)
    names = [f"layers.{i}.{p}" for i in range(2) for p in ("self_attn.out_proj", "linear1", "linear2")]
    assert list(block_modules(encoder)) == names
    assert list(block_modules(encoder, is_dense_linear)) == [n for n in names if "out_proj" not in n]
    x = torch.randn(2, 5, 16)
    encoder.eval()
    expected = encoder(x)
    quantize_model(encoder, group_size=16)
    assert type(encoder.layers[0].self_attn.out_proj) is type(out_proj)
    assert isinstance(encoder.layers[0].linear1, QuantLinear)
    torch.testing.assert_close(encoder(x), expected, atol=0.05, rtol=0.05)


def test_gpt2_conv1d_blocks_and_registry():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    assert list(find_blocks(model)) == ["transformer.h.0", "transformer.h.1"]
    assert block_modules(model) == {}  # Conv1D is not a registered linear type
    assert find_target_modules(model, "all-linear") == {}  # lm_head (tied to wte) is the head
    assert Conv1D not in surgery.LINEAR_TYPES
    register_linear_type(Conv1D)
    try:
        per_block = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        assert list(block_modules(model)) == [f"transformer.h.{i}.{p}" for i in range(2) for p in per_block]
        lowrank, _ = lowrank_param_groups(model, rank=2)
        assert len(lowrank["params"]) == 8 and "lm_head.weight" not in lowrank["param_names"]
    finally:
        surgery.LINEAR_TYPES.remove(Conv1D)


def test_every_consumer_reads_the_same_meaning():
    """param groups, quantize_model and materialize_llama select the same layers for the same value."""
    config = llama().config
    cases = [
        ("all-linear", BLOCK_LINEARS),
        (["q_proj", "mlp.down_proj"], [n for n in BLOCK_LINEARS if n.endswith(("q_proj", "down_proj"))]),
        (r"model\.layers\.1\.self_attn\..*", BLOCK_LINEARS[7:11]),
        (["lm_head"], ["lm_head"]),
    ]
    for target_modules, expected in cases:
        lowrank = lowrank_param_groups(llama(), rank=2, target_modules=target_modules)[0]
        assert lowrank["param_names"] == [f"{n}.weight" for n in expected], target_modules
        quantized = quantize_model(llama(), group_size=32, target_modules=target_modules)
        assert [n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)] == expected
        built = materialize_llama(config, dtype=torch.float32, weight_bits=8, target_modules=target_modules)
        assert [n for n, m in built.named_modules() if isinstance(m, QuantLinear)] == expected
    built = materialize_llama(config, dtype=torch.float32, weight_bits=8)  # None: the block linears
    assert [n for n, m in built.named_modules() if isinstance(m, QuantLinear)] == BLOCK_LINEARS
    assert list(find_block_linears(llama(tied=True))) == BLOCK_LINEARS  # WeLore's layers


def test_old_public_names_still_work():
    import lowrank_train.optim as optim
    from lowrank_train.welore.compress import replace_module as welore_replace_module

    assert optim.LINEAR_TYPES is surgery.LINEAR_TYPES and QuantLinear in optim.LINEAR_TYPES
    assert optim.register_linear_type is register_linear_type
    assert welore_replace_module is replace_module


def test_quantizing_a_tied_head_is_refused():
    with pytest.raises(ValueError, match="shared with 'model.embed_tokens'"):
        quantize_model(llama(tied=True), target_modules=["lm_head"])
    with pytest.raises(ValueError, match="shared"):
        materialize_llama(llama(tied=True).config, weight_bits=8, target_modules=["lm_head"])


@pytest.mark.parametrize("bad", [3, ["q_proj", 3], [""], "(unclosed", {"q_proj": 1}])
def test_bad_target_modules_are_named(bad):
    with pytest.raises(ValueError, match="target_modules"):
        find_target_modules(llama(), bad)
    with pytest.raises(ValueError, match="target_modules"):
        lowrank_param_groups(llama(), rank=2, target_modules=bad)
    with pytest.raises(ValueError, match="target_modules"):
        quantize_model(llama(), target_modules=bad)


def test_replace_module():
    model = llama()
    old = model.model.layers[1].mlp.up_proj
    new = nn.Linear(32, 64)
    assert replace_module(model, "model.layers.1.mlp.up_proj", new) is old
    assert model.model.layers[1].mlp.up_proj is new
    block = nn.Identity()
    replace_module(model, "model.layers.0", block)  # a list entry, by index
    assert model.model.layers[0] is block and len(model.model.layers) == 2
    for bad, message in [("", "root"), ("model.layers.0.nope", "no submodule"), ("model.nowhere.x", "no submodule")]:
        with pytest.raises(ValueError, match=message):
            replace_module(model, bad, nn.Identity())
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_linear_type(nn.Linear(2, 2))  # an instance, not a type
