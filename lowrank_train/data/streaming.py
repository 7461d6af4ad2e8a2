"""Batches packed on the fly from a streamed dataset (a hub corpus such as C4 ``en``), resumable bit-identically.

A streamed source is a ``datasets.IterableDataset`` of examples with a text field. Its first
``heldout_documents`` documents, in stream order, are the held-out split; the rest is the training stream,
shuffled per epoch through ``IterableDataset.shuffle(seed, buffer_size)`` (a buffer of documents, so nothing is
read ahead beyond it). Documents are tokenized as they arrive, each followed by EOS, and the token stream is cut
into ``(batch_size, seq_len)`` batches with no padding; tokens left over from a batch start the next.

Resuming. ``datasets``' own ``state_dict`` drops the contents of a shuffle buffer (the buffer is refilled with
other documents on resume), so it cannot give a bit-identical resume. :class:`StreamBatches` instead records the
epoch, how many documents of that epoch's shuffled stream it has pulled, and the tokens it holds that no batch
has used yet. A resume opens the same shuffled stream, skips that many documents (read, not tokenized) and goes on
with the saved tokens: the batches are those of the uninterrupted run, at the cost of reading the skipped
documents again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lowrank_train.data.blocks import block_stride
from lowrank_train.data.corpora import MAX_PIECE_CHARS, document_pieces, example_text
from lowrank_train.data.tokens import iter_token_chunks

logger = logging.getLogger(__name__)

STREAM_STATE = "stream"
# Documents pulled and tokenized together: enough for one efficient tokenizer call, few enough that little is
# read ahead of the batch that needs it.
DOCUMENTS_PER_CALL = 16


@dataclass(frozen=True, eq=False)
class StreamSource:
    """The training part of a streamed corpus and how it is turned into tokens.

    Attributes:
        train: the training documents in stream order (held-out documents already removed), an
            ``IterableDataset`` that supports ``shuffle(seed=..., buffer_size=...)``.
        text_field: the example field holding the text.
        name: the source, for messages.
        tokenizer: the tokenizer.
        shuffle_buffer: documents in the shuffle buffer (0: stream order, no shuffling).
        max_piece_chars: longer documents are tokenized in pieces (see ``corpora.split_text_pieces``).
        bos: when set, every packed sequence is this id followed by ``seq_len - 1`` stream tokens.
    """

    train: Any
    text_field: str
    name: str
    tokenizer: PreTrainedTokenizerBase
    shuffle_buffer: int
    max_piece_chars: int = MAX_PIECE_CHARS
    bos: int | None = None

    def epoch_documents(self, seed: int, epoch: int) -> Any:
        """The training documents of one epoch: shuffled by a buffer with a seed fixed by ``(seed, epoch)``."""
        if self.shuffle_buffer == 0:
            return self.train
        return self.train.shuffle(seed=stream_epoch_seed(seed, epoch), buffer_size=self.shuffle_buffer)

    def tokenize(self, examples: list[dict[str, Any]]) -> np.ndarray:
        """``(t,)`` int64: the examples' tokens, each document followed by EOS."""
        pieces = [
            piece
            for example in examples
            for piece in document_pieces(
                (example_text(example, self.text_field, dataset=self.name),), self.max_piece_chars
            )
        ]
        chunks = list(iter_token_chunks(pieces, self.tokenizer))
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)


def stream_epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch of a stream: a 63-bit hash of ``(seed, epoch)``."""
    digest = hashlib.sha256(f"stream:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StreamBatches(Iterator[torch.Tensor]):
    """``(batch_size, seq_len)`` int64 batches packed from a :class:`StreamSource`, forever, epoch after epoch.

    ``state_dict()`` after any batch and ``load_state_dict()`` on a fresh instance continue with exactly the
    batches the first instance would have given next.

    Args:
        source: the training stream.
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        seed: fixes the shuffling of every epoch.
        fingerprint: the data's fingerprint, recorded in the state and checked when it is loaded.
    """

    def __init__(self, source: StreamSource, *, seq_len: int, batch_size: int, seed: int, fingerprint: str) -> None:
        self.source = source
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.fingerprint = fingerprint
        self.step = 0
        self._epoch = 0
        self._examples = 0  # documents of this epoch's shuffled stream already pulled
        self._carry = np.empty(0, dtype=np.int64)  # pulled tokens no batch has used yet
        self._documents: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> torch.Tensor:
        bos = self.source.bos
        width = block_stride(self.seq_len, bos)
        needed = self.batch_size * width
        while self._carry.size < needed:
            self._pull()
        batch = torch.from_numpy(self._carry[:needed].reshape(self.batch_size, width).copy())
        if bos is not None:
            batch = torch.cat([torch.full((self.batch_size, 1), bos, dtype=batch.dtype), batch], dim=1)
        self._carry = self._carry[needed:].copy()
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: epoch, documents pulled in it, unused tokens, batches given."""
        return {
            "source": STREAM_STATE,
            "fingerprint": self.fingerprint,
            "seed": torch.tensor(self.seed, dtype=torch.int64),
            "batch_size": torch.tensor(self.batch_size, dtype=torch.int64),
            "step": torch.tensor(self.step, dtype=torch.int64),
            "epoch": torch.tensor(self._epoch, dtype=torch.int64),
            "examples": torch.tensor(self._examples, dtype=torch.int64),
            "carry": torch.from_numpy(self._carry.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; a ``ValueError`` if it belongs to other data or settings."""
        check_batch_state(state, STREAM_STATE, self.fingerprint, self.seed, self.batch_size)
        for key in ("epoch", "examples", "carry"):
            if key not in state:
                raise ValueError(f"the data stream state has no {key!r} entry")
        carry = state["carry"]
        if not isinstance(carry, torch.Tensor) or carry.dim() != 1:
            raise ValueError("the data stream state's 'carry' must be a 1-D tensor of token ids")
        self.step = int(state["step"])
        self._epoch = int(state["epoch"])
        self._examples = int(state["examples"])
        self._carry = carry.detach().cpu().to(torch.int64).numpy().copy()  # a checkpoint may load it on a GPU
        self._documents = None  # reopened, and the pulled documents skipped, at the next batch

    def _pull(self) -> None:
        if self._documents is None:
            documents = iter(self.source.epoch_documents(self.seed, self._epoch))
            if self._examples:
                logger.info(
                    "skipping %d documents of epoch %d of %s to resume", self._examples, self._epoch, self.source.name
                )
            self._documents = itertools.islice(documents, self._examples, None)
        examples = list(itertools.islice(self._documents, DOCUMENTS_PER_CALL))
        if not examples:
            if self._examples == 0:
                raise ValueError(f"the training stream of {self.source.name!r} yields no documents")
            self._epoch, self._examples, self._documents = self._epoch + 1, 0, None
            logger.info("starting epoch %d of %s", self._epoch, self.source.name)
            return
        self._examples += len(examples)
        self._carry = np.concatenate([self._carry, self.source.tokenize(examples)])


def check_batch_state(state: Any, source: str, fingerprint: str, seed: int, batch_size: int) -> None:
    """Raise a ``ValueError`` unless ``state`` is a batch state of this kind, data, seed and batch size."""
    if not isinstance(state, dict):
        raise ValueError(f"a data batch state must be a dict, got {type(state).__name__}")
    missing = [key for key in ("source", "fingerprint", "seed", "batch_size", "step") if key not in state]
    if missing:
        raise ValueError(f"the data batch state has no {missing} entries")
    if state["source"] != source:
        raise ValueError(f"the data batch state is of a {state['source']!r} source; this data is a {source!r} source")
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"the data batch state was saved for other data (fingerprint {state['fingerprint']}); this data has "
            f"fingerprint {fingerprint}: the corpus, tokenizer or seq_len changed"
        )
    for key, value in (("seed", seed), ("batch_size", batch_size)):
        if int(state[key]) != value:
            raise ValueError(f"the data batch state was saved with {key} {int(state[key])}, this run has {value}")
    if int(state["step"]) < 0:
        raise ValueError(f"the data batch state has a negative step {int(state['step'])}")
