"""PEFT LoRA models with our optimizers: adapters stay in the plain group, full-trained linears are projected."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lowrank_train.integrations.peft import adapter_parameter_ids, peft_param_groups
from lowrank_train.optim import GaLoreAdamW, lowrank_param_groups


@pytest.fixture
def lora_llama(tiny_llama):
    """LoRA on q_proj/v_proj, and the MLP up/down projections unfrozen for full (GaLore) training."""
    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if name.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")):
            param.requires_grad_(True)
    return model


def test_plain_param_groups_would_project_lora_adapters(lora_llama):
    """Why peft_param_groups exists: module-type matching sees lora_A / lora_B as ordinary linears."""
    (lowrank,) = [g for g in lowrank_param_groups(lora_llama, rank=2) if "rank" in g]
    assert any(".lora_A." in n for n in lowrank["param_names"])


def test_adapters_go_to_the_plain_group(lora_llama):
    groups = peft_param_groups(lora_llama, rank=8, update_gap=2)
    lowrank, plain = groups
    expected = {n for n, p in lora_llama.named_parameters() if p.requires_grad and n.endswith("_proj.weight")}
    expected = {n for n in expected if ".lora_" not in n}
    assert set(lowrank["param_names"]) == expected and len(expected) == 4  # up/down of 2 layers
    adapters = {n for n, _ in lora_llama.named_parameters() if ".lora_" in n}
    assert set(plain["param_names"]) == adapters and "rank" not in plain
    assert {id(p) for p in plain["params"]} == adapter_parameter_ids(lora_llama)


def test_pure_lora_model_gets_one_plain_group(tiny_llama):
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    (group,) = peft_param_groups(model, rank=2)
    assert "rank" not in group and all(".lora_" in n for n in group["param_names"])


def test_galore_on_lora_model_trains_and_matches_adamw_at_full_rank(lora_llama):
    """Identity projection at scale 1 == torch AdamW on the same trainable parameters; low rank: loss falls and
    the frozen base weights never move."""
    generator = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 256, (4, 1), generator=generator) + 3 * torch.arange(12)) % 256
    initial = {n: p.detach().clone() for n, p in lora_llama.named_parameters()}

    def train(optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
        with torch.no_grad():
            for name, p in lora_llama.named_parameters():
                p.copy_(initial[name])
        losses = []
        for _ in range(steps):
            loss = lora_llama(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    trainable = [p for p in lora_llama.parameters() if p.requires_grad]
    train(torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1), 3)
    reference = {n: p.detach().clone() for n, p in lora_llama.named_parameters()}
    groups = peft_param_groups(lora_llama, rank=8, projector="identity", scale=1.0)
    train(GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1), 3)
    for name, p in lora_llama.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=name)

    losses = train(GaLoreAdamW(peft_param_groups(lora_llama, rank=8, update_gap=2), lr=1e-2), 6)
    assert losses[-1] < losses[0]
    for name, p in lora_llama.named_parameters():
        assert torch.equal(p, initial[name]) == (not p.requires_grad), name


def test_welore_lrcs_train_directly_and_lora_adapts_the_dense_layers(tiny_llama):
    from lowrank_train.integrations.peft import welore_lora_model
    from lowrank_train.nn import LowRankLinear
    from lowrank_train.welore import WeLoreConfig, compress_model, merge_lowrank

    compress_model(tiny_llama, WeLoreConfig(target=0.1, strategy="welore", min_ratio=0.3))  # 6 of 14 factorized
    lrc_names = {n for n, m in tiny_llama.named_modules() if isinstance(m, LowRankLinear)}
    assert lrc_names
    model = welore_lora_model(tiny_llama, LoraConfig(r=2, lora_alpha=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or any(f"{lrc}." in n for lrc in lrc_names) for n in trainable)
    assert any(".lora_" in n for n in trainable) and any("factor_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():  # frozen weights never move
        if name not in trainable:
            assert torch.equal(param, before[name]), name

    with torch.no_grad():
        expected = model(input_ids=ids).logits
        dense = merge_lowrank(model.merge_and_unload())
        assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
        torch.testing.assert_close(dense(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_welore_lora_needs_a_compressed_model(tiny_llama):
    from lowrank_train.integrations.peft import welore_lora_model

    with pytest.raises(ValueError, match="no LowRankLinear layer"):
        welore_lora_model(tiny_llama, LoraConfig(r=2))


def test_target_modules_mean_what_they_mean_on_the_base_model(tiny_llama):
    """A regex or list selects the same layers in the PEFT model as PEFT's LoraConfig (and lowrank_param_groups on
    the model before wrapping) would: names are the base model's, a LoRA-wrapped layer under its own name."""
    from lowrank_train.integrations.peft import base_model_names

    regex = r"model\.layers\.\d+\.(mlp\.up_proj|self_attn\.q_proj)"
    base_names = lowrank_param_groups(tiny_llama, rank=2, target_modules=regex)[0]["param_names"]
    assert len(base_names) == 4
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    names = base_model_names(model)
    assert names["base_model.model.model.layers.0.self_attn.q_proj.base_layer"] == "model.layers.0.self_attn.q_proj"
    assert names["base_model.model.model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.up_proj"
    for name, param in model.named_parameters():  # train q_proj's base weight and up_proj in full
        if name.endswith(("q_proj.base_layer.weight", "up_proj.weight")):
            param.requires_grad_(True)
    for target_modules in (regex, ["q_proj", "mlp.up_proj"]):
        lowrank = peft_param_groups(model, rank=2, target_modules=target_modules)[0]
        wrapped = [n.removeprefix("base_model.model.").replace(".base_layer", "") for n in lowrank["param_names"]]
        assert wrapped == base_names, target_modules
    with pytest.raises(ValueError, match=r"target_modules=\['k_proj'\]"):
        peft_param_groups(model, rank=2, target_modules=["k_proj"])  # matches, but nothing trainable
