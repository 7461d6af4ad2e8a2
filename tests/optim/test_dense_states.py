"""Low-bit moments for the dense groups (optimizer.dense_state_bits): against bitsandbytes' AdamW8bit, the estimator,
both engines, the non-finite policy and a weights_only round trip."""

import copy
import io

import bitsandbytes as bnb
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowrank_train import lowrank_param_groups
from lowrank_train.memory import estimate_memory, measure_live_bytes
from lowrank_train.nn.chunked_loss import causal_lm_loss
from lowrank_train.nn.meta_init import materialize_llama
from lowrank_train.optim import QAPOLLOMini
from lowrank_train.optim.dense_states import DenseSplitOptimizer, dense_states
from lowrank_train.train.config import ConfigError, load_config
from lowrank_train.train.estimate import training_setup
from lowrank_train.train.setup import build_optimizer, prepare_model, pretrain_param_groups

DEMO = "recipes/configs/demo.yaml"
# Embedding and head of 512 x 128 = 65536 values: above bitsandbytes' 4096-value floor for 8-bit states.
CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _config(*overrides):
    base = ["model.pretrained=null", "run.device=cpu", "run.dtype=bfloat16", "optimizer.name=qapollo_mini"]
    return load_config(DEMO, [*base, *overrides])


def _model(config=None):
    """A bf16 LLaMA; with a run config, built as the run builds it from shapes (INT8 straight from the meta device)."""
    torch.manual_seed(0)
    if config is None:
        return LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model = materialize_llama(LlamaConfig(**CONFIG), dtype=torch.bfloat16, weight_bits=8, seed=0)
    return prepare_model(model, config, torch.device("cpu"))


def _state_bytes(optimizer):
    return measure_live_bytes(torch.nn.Module(), optimizer)["optimizer_states"]


def _dense_groups(model):
    groups = lowrank_param_groups(model, rank=1)
    return [g for g in groups if "rank" in g], [g for g in groups if "rank" not in g]


def test_8bit_dense_part_equals_bitsandbytes_adamw8bit():
    """The split's dense part is bitsandbytes' AdamW8bit on the same parameters (same bytes, same updates), and
    the projected part is QAPOLLOMini as if alone."""
    model, reference = _model(), _model()
    projected, plain = _dense_groups(model)
    ref_projected, ref_plain = _dense_groups(reference)
    split = DenseSplitOptimizer(QAPOLLOMini(projected, lr=1e-3), dense_states(8).build(plain, lr=1e-3))
    ref_apollo = QAPOLLOMini(ref_projected, lr=1e-3)
    ref_dense = bnb.optim.AdamW8bit([{"params": g["params"]} for g in ref_plain], lr=1e-3)
    ids = torch.randint(0, 512, (2, 16))
    for _ in range(2):
        for net, steps in ((model, (split,)), (reference, (ref_apollo, ref_dense))):
            causal_lm_loss(net, ids).backward()
            for opt in steps:
                opt.step()
                opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    dense = split.parts[1]
    assert isinstance(dense, bnb.optim.AdamW8bit)
    assert _state_bytes(dense) == _state_bytes(ref_dense)
    embedding = model.model.embed_tokens.weight
    assert dense.state[embedding]["state1"].dtype == torch.uint8  # 8-bit moments, not fp32
    assert _state_bytes(dense) < embedding.numel() * 2 * 2 * 2  # well under bf16 AdamW's 2 moments x 2 tensors


# torchao's 4-bit step compiles on first use (~10 s): slow.
@pytest.mark.parametrize(
    ("bits", "layerwise"), [(8, False), (8, True), (32, True), pytest.param(4, False, marks=pytest.mark.slow)]
)
def test_estimator_state_bytes_equal_the_live_ones(bits, layerwise):
    config = _config(f"optimizer.dense_state_bits={bits}", f"optimizer.layerwise={str(layerwise).lower()}")
    model = _model(config)
    optimizer = build_optimizer(pretrain_param_groups(model, config.optimizer), config)
    causal_lm_loss(model, torch.randint(0, 512, (2, 16))).backward()
    if not layerwise:
        assert isinstance(optimizer, DenseSplitOptimizer)
        optimizer.step()
        optimizer.zero_grad()
    else:
        inner = optimizer.inner_optimizer(model.model.embed_tokens.weight)
        assert type(inner).__name__ == {8: "AdamW8bit", 32: "AdamW", 4: "AdamW4bit"}[bits]
    measured = measure_live_bytes(model, optimizer)
    predicted = estimate_memory(CONFIG, {**training_setup(config), "batch_size": 2, "seq_len": 16})
    assert predicted.optimizer_states == measured["optimizer_states"]
    assert predicted.weights == measured["weights"]
    unset = estimate_memory(CONFIG, {**training_setup(_config()), "batch_size": 2, "seq_len": 16})
    if bits < 32:
        assert predicted.optimizer_states < unset.optimizer_states


def test_nonfinite_dense_gradient_raise_and_skip():
    def built(policy):
        config = _config("optimizer.dense_state_bits=8", f"optimizer.nonfinite={policy}")
        model = _model(config)
        return model, build_optimizer(pretrain_param_groups(model, config.optimizer), config)

    ids = torch.randint(0, 512, (2, 16))
    for policy in ("raise", "skip"):
        model, optimizer = built(policy)
        before = copy.deepcopy(model.state_dict())
        causal_lm_loss(model, ids).backward()
        model.model.norm.weight.grad[0] = float("nan")
        if policy == "raise":
            with pytest.raises(ValueError, match=r"non-finite gradient.*model\.norm\.weight; nothing was stepped"):
                optimizer.step()
        else:
            optimizer.step()
            assert optimizer.skipped_steps == 1
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_state_dict_round_trip_resumes_identically():
    config = _config("optimizer.dense_state_bits=8")
    ids = torch.randint(0, 512, (2, 16))

    def step(model, optimizer):
        causal_lm_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()

    model = _model(config)
    optimizer = build_optimizer(pretrain_param_groups(model, config.optimizer), config)
    step(model, optimizer)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(config)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = build_optimizer(pretrain_param_groups(resumed, config.optimizer), config)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    step(model, optimizer)
    step(resumed, resumed_optimizer)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    unsplit = build_optimizer(pretrain_param_groups(_model(_config()), _config().optimizer), _config())
    with pytest.raises(ValueError, match="dense_state_bits"):
        resumed_optimizer.load_state_dict(unsplit.state_dict())


def test_bad_dense_state_bits_are_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"optimizer\.dense_state_bits must be 32, 8, 4 or None, got 6"):
        _config("optimizer.dense_state_bits=6")
    with pytest.raises(ConfigError, match=r"optimizer\.dense_state_bits applies to the GaLore family"):
        load_config(DEMO, ["optimizer.name=adamw", "optimizer.dense_state_bits=8"])
    with pytest.raises(ValueError, match="dense_state_bits=8 needs a GaLore-family optimizer"):
        estimate_memory(CONFIG, {"optimizer": "adamw", "dense_state_bits": 8})
    with pytest.raises(ValueError, match="dense_state_bits must be"):
        dense_states(16)
