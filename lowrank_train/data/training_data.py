"""The one entry point of the training loop into the data: :func:`open_training_data`.

Two kinds of source, one interface (:class:`TrainingData`):

* **Local** (offline ``kjv`` / ``shakespeare``, local ``.txt`` / ``.jsonl`` files and folders): tokenized once,
  document by document in bounded memory, into a memory-mapped token file keyed by the text and the tokenizer
  (:mod:`lowrank_train.data.token_file`); training blocks are sliced from the file batch by batch. Held-out =
  the tail ``heldout_fraction`` of the token stream. Batch order as :func:`~lowrank_train.data.iterate_batches`:
  a permutation per ``(seed, epoch)``, step ``k`` always the same batch.
* **Streamed** (hub datasets such as ``allenai/c4`` ``en``, any ``datasets.IterableDataset``, or a local source
  with ``streaming=True``): read through ``datasets`` in streaming mode, shuffled by a buffer, packed on the fly
  (:mod:`lowrank_train.data.streaming`). Held-out = the first ``heldout_documents`` documents of the stream.

Either way ``train_batches()`` returns an iterator with ``state_dict()`` / ``load_state_dict()``: storing that state
in a checkpoint resumes the batch stream bit-identically, and ``fingerprint`` names the data (text, tokenizer,
``seq_len``, split) so a resume on other data can be refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lowrank_train.data.blocks import TokenBlocks, check_split_settings, split_token_blocks
from lowrank_train.data.corpora import (
    MAX_PIECE_CHARS,
    corpus_fingerprint,
    document_selection,
    is_hub_source,
    iter_documents,
    open_hub_stream,
)
from lowrank_train.data.packing import iterate_batches
from lowrank_train.data.streaming import StreamBatches, StreamSource, check_batch_state
from lowrank_train.data.token_file import build_token_file
from lowrank_train.data.tokenizer import leading_bos_id, tokenizer_fingerprint

logger = logging.getLogger(__name__)

# Bump when what a fingerprint covers changes.
DATA_FINGERPRINT_FORMAT = 1
BLOCKS_STATE = "blocks"
# Streamed held-out documents when neither heldout_documents nor max_documents says how many.
DEFAULT_HELDOUT_DOCUMENTS = 1000
DEFAULT_SHUFFLE_BUFFER = 10_000


class BlockBatches(Iterator[torch.Tensor]):
    """``(batch_size, seq_len)`` batches of :class:`TokenBlocks` in :func:`iterate_batches` order, resumable.

    Args:
        blocks: the training blocks.
        batch_size: blocks per batch.
        seed: fixes the order of every epoch.
        fingerprint: the data's fingerprint, recorded in the state and checked when it is loaded.
        start_step: the first batch to give.
    """

    def __init__(
        self, blocks: TokenBlocks, *, batch_size: int, seed: int, fingerprint: str, start_step: int = 0
    ) -> None:
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.fingerprint = fingerprint
        self._seek(start_step)

    def __iter__(self) -> BlockBatches:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self._batches)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The number of batches given, with what they were drawn from."""
        return {
            "source": BLOCKS_STATE,
            "fingerprint": self.fingerprint,
            "seed": torch.tensor(self.seed, dtype=torch.int64),
            "batch_size": torch.tensor(self.batch_size, dtype=torch.int64),
            "step": torch.tensor(self.step, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; a ``ValueError`` if it belongs to other data or settings."""
        check_batch_state(state, BLOCKS_STATE, self.fingerprint, self.seed, self.batch_size)
        self._seek(int(state["step"]))

    def _seek(self, step: int) -> None:
        self._batches = iterate_batches(self.blocks, self.batch_size, seed=self.seed, start_step=step)
        self.step = step


@dataclass(frozen=True, eq=False)
class TrainingData:
    """Held-out blocks, a resumable stream of training batches, and what identifies them.

    Build with :func:`open_training_data`.

    Attributes:
        source: the corpus, for messages.
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        seed: fixes the batch order (local) or the shuffling (streamed).
        heldout: ``(M, seq_len)`` held-out blocks; slicing or indexing gives int64 tensors.
        max_token_id: the largest token id in the data (streamed: the tokenizer's largest id, as the stream is
            not read ahead), for :func:`~lowrank_train.data.check_vocab_fits`.
        fingerprint: hex digest of what decides the tokens and their blocks: the text (local: the checksum of
            its token stream, so a touched but unchanged file keeps it), the tokenizer's content, ``seq_len`` and
            the held-out split (streamed: the source's name / config / split, and the shuffle buffer). Not the
            seed or batch size (the run's config). Store it in the checkpoint and refuse a resume when it changed.
        train: the training blocks of a local source, ``None`` when streamed.
        stream: the training stream of a streamed source, ``None`` when local.
        token_file: the token file a local source is read from.
    """

    source: str
    seq_len: int
    batch_size: int
    seed: int
    heldout: TokenBlocks
    max_token_id: int
    fingerprint: str
    train: TokenBlocks | None = None
    stream: StreamSource | None = None
    token_file: Path | None = None

    @property
    def streamed(self) -> bool:
        """True when batches are packed from a stream rather than sliced from a token file."""
        return self.stream is not None

    @property
    def num_train_sequences(self) -> int | None:
        """Training blocks of ``seq_len`` tokens; ``None`` for a stream (its length is not known)."""
        return None if self.train is None else self.train.num_blocks

    def train_batches(self, start_step: int = 0) -> BlockBatches | StreamBatches:
        """The training batches from batch ``start_step`` on; ``load_state_dict`` moves them to a saved position.

        For a stream, ``start_step > 0`` packs and drops the first ``start_step`` batches (exact but slow:
        resume with ``load_state_dict`` instead).
        """
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative, got {start_step}")
        if self.train is not None:
            return BlockBatches(
                self.train,
                batch_size=self.batch_size,
                seed=self.seed,
                fingerprint=self.fingerprint,
                start_step=start_step,
            )
        assert self.stream is not None
        batches = StreamBatches(
            self.stream, seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed, fingerprint=self.fingerprint
        )
        if start_step:
            logger.warning(
                "replaying %d batches of the stream %s to reach step %d; a saved batches.state_dict() resumes "
                "without tokenizing them",
                start_step,
                self.source,
                start_step,
            )
            for _ in range(start_step):
                next(batches)
        return batches

    def calibration_blocks(self, count: int) -> torch.Tensor:
        """``(count, seq_len)`` int64: the first training blocks in corpus (or epoch-0 stream) order."""
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        if self.train is not None:
            if count > self.train.num_blocks:
                raise ValueError(f"asked for {count} calibration blocks; {self.source!r} has {self.train.num_blocks}")
            return self.train[:count]
        batches = self.train_batches()
        blocks = [next(batches) for _ in range(-(-count // self.batch_size))]
        return torch.cat(blocks)[:count]

    def describe(self) -> str:
        """A short account of the data for the run log."""
        if self.train is not None:
            return f"{self.train.num_blocks} training sequences of {self.seq_len} tokens from {self.source!r}"
        assert self.stream is not None
        buffer = f"shuffle buffer {self.stream.shuffle_buffer}" if self.stream.shuffle_buffer else "stream order"
        return f"sequences of {self.seq_len} tokens streamed from {self.source!r} ({buffer})"


def open_training_data(
    corpus: str | os.PathLike[str] | Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    heldout_fraction: float = 0.01,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    streaming: bool | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    heldout_documents: int | None = None,
    max_piece_chars: int = MAX_PIECE_CHARS,
) -> TrainingData:
    """Open a corpus for training: a memory-mapped token file for local sources, a packed stream for hub ones.

    Args:
        corpus: ``kjv`` / ``shakespeare``, a local ``.txt`` / ``.jsonl`` file or folder, a hub dataset name, or a
            ``datasets.IterableDataset`` (streamed).
        tokenizer: the tokenizer (its content is part of the cache key and of the fingerprint).
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        seed: fixes the batch order (local) or the per-epoch shuffling (streamed).
        heldout_fraction: local: share of the token stream held out from its end. Streamed: the share of
            ``max_documents`` held out from the start when ``heldout_documents`` is not given.
        hub_config: configuration of a hub dataset (e.g. ``"en"``).
        split: split of a hub dataset.
        text_field: text field of ``.jsonl`` lines and dataset examples.
        max_documents: read at most this many documents (held-out ones included).
        cache_dir: folder of the token files (``None``: ``<cache>/tokens``).
        streaming: ``None``: stream hub names and dataset objects, tokenize local sources into a file. ``True``
            streams any source (a local one through ``datasets.IterableDataset.from_generator``); ``False``
            tokenizes a hub source into a file (it must be finite: pass ``max_documents``).
        shuffle_buffer: streamed: documents in the shuffle buffer (0: stream order).
        heldout_documents: streamed: the first this many documents are held out. Default
            ``round(heldout_fraction * max_documents)`` (at least 1) with ``max_documents``, else
            :data:`DEFAULT_HELDOUT_DOCUMENTS`; 0 for ``heldout_fraction == 0``.
        max_piece_chars: documents longer than this are tokenized in pieces (bounded memory).

    Raises:
        ValueError: an argument is out of range (before any work), or the corpus is too small for one batch.
    """
    for name, value in (("batch_size", batch_size), ("max_piece_chars", max_piece_chars)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_split_settings(seq_len, heldout_fraction)
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents <= 0):
        raise ValueError(f"max_documents must be a positive integer or None, got {max_documents!r}")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be a non-negative integer (0: no shuffling), got {shuffle_buffer!r}")
    if heldout_documents is not None and (not isinstance(heldout_documents, int) or heldout_documents < 0):
        raise ValueError(f"heldout_documents must be a non-negative integer or None, got {heldout_documents!r}")
    if isinstance(corpus, os.PathLike):
        corpus = os.fspath(corpus)
    is_dataset = not isinstance(corpus, str)
    if is_dataset and streaming is False:
        raise ValueError("a dataset object is always streamed; pass streaming=None or True")
    if streaming is None:
        streaming = is_dataset or is_hub_source(corpus)
    selection = document_selection(
        hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
    )
    if streaming:
        return _open_stream(
            corpus,
            tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            heldout_fraction=heldout_fraction,
            shuffle_buffer=shuffle_buffer,
            heldout_documents=heldout_documents,
            max_piece_chars=max_piece_chars,
            **selection,
        )
    token_file = build_token_file(corpus, tokenizer, max_piece_chars=max_piece_chars, cache_dir=cache_dir, **selection)
    bos = leading_bos_id(tokenizer)
    train, heldout = split_token_blocks(token_file.tokens, seq_len, heldout_fraction, bos)
    if train.num_blocks < batch_size:
        raise ValueError(
            f"batch_size ({batch_size}) exceeds the {train.num_blocks} training sequences of {seq_len} tokens in "
            f"{corpus!r}: lower batch_size or seq_len"
        )
    header = token_file.header
    fingerprint = _digest(
        {
            "kind": "tokens",
            "tokens_sha256": header.sha256,
            "num_tokens": header.num_tokens,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "seq_len": seq_len,
            "heldout_fraction": heldout_fraction,
            **_bos_entry(bos),
        }
    )
    return TrainingData(
        source=corpus,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        heldout=heldout,
        max_token_id=header.max_token_id,
        fingerprint=fingerprint,
        train=train,
        token_file=token_file.path,
    )


def _open_stream(
    corpus: str | Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    heldout_fraction: float,
    hub_config: str | None,
    split: str,
    text_field: str,
    max_documents: int | None,
    shuffle_buffer: int,
    heldout_documents: int | None,
    max_piece_chars: int,
) -> TrainingData:
    if isinstance(corpus, str):
        name = corpus
        corpus_id = corpus_fingerprint(
            corpus, hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
        )
        if is_hub_source(corpus):
            dataset = open_hub_stream(corpus, hub_config=hub_config, split=split)
        else:
            dataset, text_field = _local_stream(corpus, text_field=text_field), "text"
    else:
        dataset, name = corpus, _dataset_name(corpus)
        corpus_id = _dataset_identity(corpus, text_field, max_documents)
    for method in ("take", "skip", "shuffle"):
        if not callable(getattr(dataset, method, None)):
            raise ValueError(f"a streamed corpus must be a datasets.IterableDataset; {name!r} has no {method}()")
    if heldout_documents is None:
        if heldout_fraction == 0:
            heldout_documents = 0
        elif max_documents is not None:
            heldout_documents = max(1, round(heldout_fraction * max_documents))
        else:
            heldout_documents = DEFAULT_HELDOUT_DOCUMENTS
    if max_documents is not None:
        if heldout_documents >= max_documents:
            raise ValueError(
                f"{heldout_documents} held-out documents leave none of max_documents={max_documents} for training; "
                "lower heldout_documents / heldout_fraction or raise max_documents"
            )
        dataset = dataset.take(max_documents)
    source = StreamSource(
        train=dataset.skip(heldout_documents) if heldout_documents else dataset,
        text_field=text_field,
        name=name,
        tokenizer=tokenizer,
        shuffle_buffer=shuffle_buffer,
        max_piece_chars=max_piece_chars,
        bos=leading_bos_id(tokenizer),
    )
    heldout = TokenBlocks.from_stream(np.empty(0, dtype=np.int64), seq_len, source.bos)
    no_training = (
        f"holding out the first {heldout_documents} documents of {name!r} leaves none for training; lower "
        "heldout_documents (or heldout_fraction with max_documents)"
    )
    if heldout_documents:
        examples = list(dataset.take(heldout_documents))
        if len(examples) < heldout_documents:
            raise ValueError(f"{name!r} has only {len(examples)} documents: {no_training}")
        tokens = source.tokenize(examples)
        heldout = TokenBlocks.from_stream(tokens, seq_len, source.bos)
        if heldout.num_blocks == 0:
            raise ValueError(
                f"the first {heldout_documents} documents of {name!r} give {tokens.size} tokens, fewer than one "
                f"held-out block of {seq_len}; raise heldout_documents"
            )
    # One training document, read now in stream order (not through the shuffle buffer): an empty training stream
    # or a missing text field fails here rather than at the first step.
    first = next(iter(source.train), None)
    if first is None:
        raise ValueError(no_training)
    source.tokenize([first])
    fingerprint = _digest(
        {
            "kind": "stream",
            "corpus": corpus_id,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "seq_len": seq_len,
            "heldout_documents": heldout_documents,
            "shuffle_buffer": shuffle_buffer,
            "max_piece_chars": max_piece_chars,
            **_bos_entry(source.bos),
        }
    )
    logger.info("streaming %s: %d held-out documents, shuffle buffer %d", name, heldout_documents, shuffle_buffer)
    return TrainingData(
        source=name,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        heldout=heldout,
        max_token_id=len(tokenizer) - 1,
        fingerprint=fingerprint,
        stream=source,
    )


def _bos_entry(bos: int | None) -> dict[str, int]:
    # Only when set: the fingerprints of data without BOS blocks, and so their runs' resumes, stay as they were.
    return {} if bos is None else {"bos": bos}


def _local_stream(source: str, *, text_field: str) -> Any:
    from datasets import IterableDataset

    return IterableDataset.from_generator(_document_records, gen_kwargs={"source": source, "text_field": text_field})


def _document_records(source: str, text_field: str) -> Iterator[dict[str, str]]:
    for document in iter_documents(source, text_field=text_field):
        yield {"text": document}


def _dataset_name(dataset: Any) -> str:
    info = getattr(dataset, "info", None)
    return str(getattr(info, "dataset_name", None) or type(dataset).__name__)


def _dataset_identity(dataset: Any, text_field: str, max_documents: int | None) -> str:
    """What identifies a dataset object: name, config, split, features, shards (contents are not hashed)."""
    info = getattr(dataset, "info", None)
    parts = [
        _dataset_name(dataset),
        str(getattr(info, "config_name", None)),
        str(getattr(dataset, "split", None)),
        repr(getattr(dataset, "features", None)),
        str(getattr(dataset, "num_shards", None)),
        text_field,
        str(max_documents),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps({"format": DATA_FINGERPRINT_FORMAT, **parts}, sort_keys=True).encode()
    ).hexdigest()
