"""Text pieces to token ids in bounded memory: the smallest integer type that holds a vocabulary, batched encoding.

The token stream of a corpus is every document's tokens followed by the tokenizer's EOS token, in corpus order
(the layout :func:`lowrank_train.data.packing.tokenize_documents` builds in memory). Here it is produced as a
sequence of NumPy chunks, each from one tokenizer call over a bounded number of characters, so a corpus of any
size is tokenized with the memory of one chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

# One tokenizer call encodes at most this many characters (or BATCH_PIECES pieces): a few tens of MB of
# working memory in a fast tokenizer, and enough texts per call for its batch parallelism.
BATCH_CHARS = 1 << 20
BATCH_PIECES = 64

# The unsigned types a token file may hold, smallest first.
TOKEN_DTYPES = (np.dtype("<u2"), np.dtype("<u4"))


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits, else ``uint32`` (little-endian)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for dtype in TOKEN_DTYPES:
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit in uint32 token ids")


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's EOS id, the separator appended after every document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token_id to separate documents")
    return int(eos)


def tokenize_pieces(pieces: Sequence[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Encode ``(piece, ends_document)`` pairs in one tokenizer call, EOS after each document's last piece.

    Args:
        pieces: texts in stream order; ``ends_document`` marks the last piece of a document.
        tokenizer: a tokenizer with an EOS token; no other special tokens are added.

    Returns:
        ``(T,)`` int64 token ids.
    """
    eos = eos_token_id(tokenizer)
    if not pieces:
        return np.empty(0, dtype=np.int64)
    # verbose=False: whole books are longer than model_max_length, which is expected before packing.
    encoded = tokenizer(
        [text for text, _ in pieces],
        add_special_tokens=False,
        verbose=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    total = sum(len(ids) + ends for ids, (_, ends) in zip(encoded, pieces, strict=True))
    flat = itertools.chain.from_iterable(
        (*ids, eos) if ends else ids for ids, (_, ends) in zip(encoded, pieces, strict=True)
    )
    return np.fromiter(flat, dtype=np.int64, count=total)


def iter_token_chunks(
    pieces: Iterable[tuple[str, bool]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_chars: int = BATCH_CHARS,
    batch_pieces: int = BATCH_PIECES,
) -> Iterator[np.ndarray]:
    """Tokenize a stream of ``(piece, ends_document)`` pairs, one call per ``batch_chars`` characters.

    The concatenation of the chunks is the corpus' token stream; each chunk is ``(t,)`` int64.
    """
    eos_token_id(tokenizer)  # fail before reading anything
    batch: list[tuple[str, bool]] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if chars >= batch_chars or len(batch) >= batch_pieces:
            yield tokenize_pieces(batch, tokenizer)
            batch, chars = [], 0
    if batch:
        yield tokenize_pieces(batch, tokenizer)
