"""Saving and loading compressed models (no SVD on load), rank validation, merge and dense export."""

import json
import os

import pytest
import torch

from lowrank_train.nn.lowrank_linear import LowRankLinear
from lowrank_train.welore import (
    WeLoreConfig,
    compress_model,
    export_dense,
    load_compressed,
    lowrank_layers,
    mark_trainable,
    merge_lowrank,
    save_compressed,
)


@pytest.fixture
def compressed(llama, calibration):
    compress_model(llama, WeLoreConfig(target=0.3, strategy="whitened", min_ratio=0.0), calibration)
    # One training step so the factors are no longer exactly an SVD of anything.
    optimizer = torch.optim.SGD(mark_trainable(llama, "all"), lr=1e-2)
    llama(calibration[:2], labels=calibration[:2]).loss.backward()
    optimizer.step()
    return llama.eval()


def test_round_trip_gives_identical_logits(compressed, calibration, tmp_path, monkeypatch):
    save_compressed(compressed, tmp_path)
    assert {"welore.json", "model.safetensors", "config.json"} <= set(os.listdir(tmp_path))

    def no_svd(*args, **kwargs):
        raise AssertionError("loading must not run an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    monkeypatch.setattr(torch.linalg, "svdvals", no_svd)
    loaded = load_compressed(tmp_path)
    assert {n: m.rank for n, m in lowrank_layers(loaded).items()} == {
        n: m.rank for n, m in lowrank_layers(compressed).items()
    }
    with torch.no_grad():
        assert torch.equal(loaded(calibration).logits, compressed(calibration).logits)
    # Tied embeddings stay tied after loading.
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_round_trip_bfloat16(compressed, calibration, tmp_path):
    compressed = compressed.to(torch.bfloat16)
    save_compressed(compressed, tmp_path)
    loaded = load_compressed(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(calibration[:4]).logits, compressed(calibration[:4]).logits)


def _edit_ranks(path, edit):
    ranks_file = os.path.join(path, "welore.json")
    with open(ranks_file) as handle:
        description = json.load(handle)
    edit(description["layers"])
    with open(ranks_file, "w") as handle:
        json.dump(description, handle)


def test_ranks_that_do_not_match_tensors(compressed, tmp_path):
    save_compressed(compressed, tmp_path)
    name = next(iter(lowrank_layers(compressed)))

    _edit_ranks(tmp_path, lambda layers: layers[name].update(rank=layers[name]["rank"] + 1))
    with pytest.raises(ValueError, match="do not match the tensors.*needs"):
        load_compressed(tmp_path)

    _edit_ranks(tmp_path, lambda layers: layers.pop(name))
    with pytest.raises(ValueError, match="not described in welore.json"):
        load_compressed(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a compressed checkpoint"):
        load_compressed(tmp_path)


def test_merge_and_dense_export(compressed, calibration, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = merge_lowrank(compressed)
    assert not lowrank_layers(merged) and lowrank_layers(compressed)  # the original keeps its factors
    with torch.no_grad():
        reference = compressed(calibration).logits
        assert torch.allclose(merged(calibration).logits, reference, atol=1e-4)
    export_dense(compressed, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    with torch.no_grad():
        assert torch.allclose(dense(calibration).logits, reference, atol=1e-4)
    # merge is idempotent: merging an already dense model changes nothing.
    again = merge_lowrank(merged)
    assert all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), merged.state_dict().values(), strict=True)
    )


def test_save_is_whole_and_refuses_a_non_empty_folder(compressed, tmp_path):
    from lowrank_train.folders import FolderExistsError

    folder = tmp_path / "out"
    save_compressed(compressed, folder)
    first = (folder / "model.safetensors").read_bytes()
    with pytest.raises(FolderExistsError, match=f"{folder}.*--overwrite"):
        save_compressed(compressed, folder)
    assert (folder / "model.safetensors").read_bytes() == first
    (folder / "stale.txt").write_text("from before")
    save_compressed(compressed, folder, overwrite=True)  # replaced whole: nothing of the old folder stays
    assert not (folder / "stale.txt").exists() and sorted(os.listdir(tmp_path)) == ["out"]
