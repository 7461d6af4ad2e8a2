import pytest
import torch
from torch import nn

from lowrank_train import lowrank_param_groups


def test_default_groups_split_linear_weights_from_the_rest(tiny_llama):
    lowrank, plain = lowrank_param_groups(tiny_llama, rank=8, update_gap=50, scale=0.5, projector="rsvd")
    assert lowrank["rank"] == 8 and lowrank["update_gap"] == 50 and lowrank["projector"] == "rsvd"
    expected = {
        n for n, p in tiny_llama.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n
    }
    assert set(lowrank["param_names"]) == expected
    assert len(expected) == 2 * 7  # q k v o gate up down per layer
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(plain["param_names"])
    assert all(p.dim() == 2 for p in lowrank["params"])


def test_tied_head_is_not_projected(tiny_llama):
    tiny_llama.lm_head.weight = tiny_llama.model.embed_tokens.weight
    lowrank, plain = lowrank_param_groups(tiny_llama, rank=4)
    ids = {id(p) for p in lowrank["params"]}
    assert id(tiny_llama.model.embed_tokens.weight) not in ids
    total = sum(len(g["params"]) for g in (lowrank, plain))
    assert total == len(list(tiny_llama.parameters()))


def test_target_modules_by_suffix_list_and_regex(tiny_llama):
    lowrank, _ = lowrank_param_groups(tiny_llama, rank=4, target_modules=["q_proj", "v_proj"])
    assert len(lowrank["params"]) == 4
    assert all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in lowrank["param_names"])
    lowrank, _ = lowrank_param_groups(tiny_llama, rank=4, target_modules=r".*\.mlp\..*")
    assert len(lowrank["params"]) == 6


def test_no_match_and_frozen_params():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="no trainable linear weight matches"):
        lowrank_param_groups(model, rank=2, target_modules=["q_proj"])
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable linear weight"):
        lowrank_param_groups(model, rank=2)


def test_extra_options_reach_the_lowrank_group(tiny_llama):
    lowrank, plain = lowrank_param_groups(tiny_llama, rank=4, lr=1e-2, full_rank_fallback=True)
    assert lowrank["lr"] == 1e-2 and lowrank["full_rank_fallback"] is True
    assert "lr" not in plain
    assert torch.is_tensor(lowrank["params"][0])


def test_target_modules_meaning(tiny_llama):
    """One meaning (lowrank_train.nn.surgery): a string is a full-name regex, a list entry a name or dotted
    suffix, None the block linears; an explicit name selects the head, "all-linear" never does."""
    with pytest.raises(ValueError, match="no trainable linear weight matches"):
        lowrank_param_groups(tiny_llama, rank=4, target_modules="q_proj")  # fullmatch: the bare suffix is no match
    lowrank, _ = lowrank_param_groups(tiny_llama, rank=4, target_modules=["self_attn.q_proj", "lm_head"])
    assert lowrank["param_names"] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight",
    ]
    default, _ = lowrank_param_groups(tiny_llama, rank=4)
    blocks, _ = lowrank_param_groups(tiny_llama, rank=4, target_modules=None)
    assert blocks["param_names"] == default["param_names"] and "lm_head.weight" not in default["param_names"]


def test_registered_linear_type_is_projected():
    from lowrank_train.optim import LINEAR_TYPES, register_linear_type

    class Bilinear2D(nn.Module):  # any module holding a 2-D `weight`
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4))

    model = nn.Sequential(Bilinear2D(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no trainable linear weight"):
        lowrank_param_groups(model, rank=2)
    register_linear_type(Bilinear2D)
    try:
        lowrank, plain = lowrank_param_groups(model, rank=2)
        assert lowrank["param_names"] == ["0.weight"] and plain["param_names"] == ["1.weight", "1.bias"]
    finally:
        LINEAR_TYPES.remove(Bilinear2D)
