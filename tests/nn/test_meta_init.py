"""materialize_llama: same model as Hugging Face's constructor, INT8 layers without the float model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowrank_train.memory import measure_live_bytes, measure_peak
from lowrank_train.nn import QuantLinear, quantize_model
from lowrank_train.nn.meta_init import build_meta_llama, materialize_llama


def _config(layers=2, tied=False):
    return LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )


def test_meta_build_allocates_nothing():
    model = build_meta_llama(_config())
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_float_model_matches_hf_structure_and_init(tied):
    config = _config(tied=tied)
    ours = materialize_llama(config, dtype=torch.float32, seed=0)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config)
    assert dict((n, p.shape) for n, p in ours.named_parameters()) == dict(
        (n, p.shape) for n, p in reference.named_parameters()
    )
    for (name, buf), (_, ref_buf) in zip(ours.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(buf, ref_buf, msg=name)  # RoPE inv_freq recomputed for real
    std = config.initializer_range
    for name, param in ours.named_parameters():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert abs(param.std().item() - std) < 0.1 * std, name
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 300, (2, 8))
    out = ours(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(300.0)).item()) < 0.5


def test_seed_is_reproducible():
    a = materialize_llama(_config(), dtype=torch.float32, seed=3)
    b = materialize_llama(_config(), dtype=torch.float32, seed=3)
    c = materialize_llama(_config(), dtype=torch.float32, seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])


def test_int8_build_equals_quantizing_the_float_build():
    config = _config()
    quantized = materialize_llama(config, dtype=torch.float32, weight_bits=8, weight_group_size=64, seed=1)
    reference = quantize_model(materialize_llama(config, dtype=torch.float32, seed=1), bits=8, group_size=64)
    assert isinstance(quantized.model.layers[0].mlp.up_proj, QuantLinear)
    assert not isinstance(quantized.lm_head, QuantLinear)
    ours, theirs = quantized.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], msg=key)


def test_int8_build_has_the_requested_init_std():
    """Independent reference: the std asked for (config.initializer_range), on the dequantized INT8 weights."""
    config = _config()
    std = config.initializer_range
    model = materialize_llama(config, dtype=torch.bfloat16, weight_bits=8, weight_group_size=64, seed=2)
    weights = [m.dequantized_weight(torch.float32) for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(weights) == 2 * 7
    for weight in weights:  # >= 2048 draws each: the sample std is within ~2% (1 sigma) of the true one
        assert abs(weight.std().item() - std) < 0.1 * std
        assert abs(weight.mean().item()) < 5 * std / weight.numel() ** 0.5
    pooled = torch.cat([w.flatten() for w in weights])  # 86k draws: 1 sigma is 0.25%
    assert abs(pooled.std().item() - std) < 0.02 * std


def test_int8_bf16_build_trains_like_a_normally_built_model():
    """Reference: a bf16 model built the normal way (Hugging Face's ``from_config(dtype=bf16)``, which keeps RoPE's
    inv_freq fp32, then quantize_model), loaded with the same weights. It has its own RoPE buffers, norms,
    gradient carriers and flags; the meta-built model must give the same loss, bf16 gradients and the same loss
    after one Q-GaLore step (deterministic: SVD basis, seeded rounding)."""
    from lowrank_train import lowrank_param_groups
    from lowrank_train.optim import QGaLoreAdamW8bit

    config = _config()
    built = materialize_llama(config, dtype=torch.bfloat16, weight_bits=8, weight_group_size=64, seed=5)
    normal = quantize_model(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), bits=8, group_size=64)
    normal.load_state_dict(built.state_dict())
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    losses = {}
    for name, model in (("built", built), ("normal", normal)):
        optimizer = QGaLoreAdamW8bit(lowrank_param_groups(model, rank=8, update_gap=10), lr=1e-2)
        before = model(input_ids=ids, labels=ids).loss
        before.backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.bfloat16
        optimizer.step()
        with torch.no_grad():
            after = model(input_ids=ids, labels=ids).loss
        losses[name] = (before.item(), after.item())
    assert losses["built"][0] == losses["normal"][0]
    assert losses["normal"][1] < losses["normal"][0] - 0.05  # the step moved the model
    assert abs(losses["built"][1] - losses["normal"][1]) < 1e-3 * losses["normal"][0]


def test_int8_build_never_holds_the_float_model():
    config = _config(layers=6)
    model, peak = measure_peak(lambda: materialize_llama(config, dtype=torch.bfloat16, weight_bits=8))
    final = measure_live_bytes(model)["weights"]
    bf16_model = sum(p.numel() for p in build_meta_llama(config).parameters()) * 2
    largest_linear_fp32 = 160 * 64 * 4
    assert final < 0.7 * bf16_model
    assert peak < bf16_model
    # beyond the finished model: one fp32 linear weight and its quantization temporaries
    assert peak - final <= 4 * largest_linear_fp32


def test_bad_bits():
    with pytest.raises(ValueError, match="weight_bits"):
        materialize_llama(_config(), weight_bits=3)
