"""Pack a corpus into fixed-length blocks in memory, and serve resumable batches from blocks.

The token stream is every document's tokens followed by the tokenizer's EOS token, concatenated in corpus
order. The held-out split is the *tail* of that stream (see :mod:`lowrank_train.data.blocks`). This module holds
the in-memory path (:func:`tokenize_documents`, :func:`split_train_heldout`, :class:`PackedCorpus`), kept for
small corpora and as the reference the streaming path is tested against, and the batch order
(:func:`epoch_permutation`, :func:`iterate_batches`) that both paths share. :func:`build_packed_corpus` reads
the corpus through the cached token file of :mod:`lowrank_train.data.token_file` (tokenized once, in bounded
memory) and copies the blocks into tensors; training on a large corpus should use
:func:`lowrank_train.data.open_training_data`, which never copies the corpus into memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lowrank_train.data.blocks import TokenBlocks, check_split_settings, heldout_block_count, split_token_blocks
from lowrank_train.data.corpora import document_selection
from lowrank_train.data.token_file import TokenFile, build_token_file, token_file_path
from lowrank_train.data.tokenizer import leading_bos_id, tokenizer_fingerprint

__all__ = [
    "PackedCorpus",
    "build_packed_corpus",
    "check_vocab_fits",
    "epoch_permutation",
    "iterate_batches",
    "pack_blocks",
    "packed_cache_path",
    "split_train_heldout",
    "tokenize_documents",
    "tokenizer_fingerprint",
]


@dataclass(frozen=True, eq=False)  # tensors have no single truth value, so no generated __eq__
class PackedCorpus:
    """Training and held-out token blocks of one corpus.

    Attributes:
        train: ``(N, seq_len)`` int64 token ids, in corpus order.
        heldout: ``(M, seq_len)`` int64 token ids from the end of the token stream.
        seq_len: tokens per block.
        eos_token_id: the separator appended after every document.
        max_token_id: the largest id in ``train`` and ``heldout`` (for :func:`check_vocab_fits`).
        num_tokens: length of the whole token stream before packing.
        source: the corpus source string.
        tokenizer_name: the tokenizer's ``name_or_path``.
    """

    train: torch.Tensor
    heldout: torch.Tensor
    seq_len: int
    eos_token_id: int
    max_token_id: int
    num_tokens: int
    source: str
    tokenizer_name: str


def tokenize_documents(
    documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 64
) -> torch.Tensor:
    """Tokenize documents into one stream, each document followed by the EOS token.

    Args:
        documents: the texts, in order.
        tokenizer: a tokenizer with an ``eos_token_id``; no other special tokens are added.
        batch_size: documents tokenized per call (fast tokenizers parallelise within a batch).

    Returns:
        ``(T,)`` int64 token ids.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token_id to separate documents")
    chunks: list[torch.Tensor] = []
    batch: list[str] = []

    def flush() -> None:
        # verbose=False: whole books are longer than model_max_length, which is expected before packing.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            chunks.append(torch.tensor([*ids, eos], dtype=torch.int64))
        batch.clear()

    for document in documents:
        batch.append(document)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not chunks:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(chunks)


def pack_blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a ``(T,)`` stream into ``(T // seq_len, seq_len)`` blocks, dropping the remainder."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    num_blocks = stream.numel() // seq_len
    return stream[: num_blocks * seq_len].reshape(num_blocks, seq_len).clone()


def split_train_heldout(
    stream: torch.Tensor, seq_len: int, heldout_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a stream into training blocks and held-out blocks taken from its end.

    The held-out region is ``round(heldout_fraction * T / seq_len)`` whole blocks (at least one when the
    fraction is positive) at the end of the stream; the training region is everything before it.

    Args:
        stream: ``(T,)`` token ids.
        seq_len: tokens per block.
        heldout_fraction: share of the stream held out, in ``[0, 1)``.

    Returns:
        ``(train, heldout)`` of shapes ``(N, seq_len)`` and ``(M, seq_len)``.
    """
    heldout_blocks = heldout_block_count(stream.numel(), seq_len, heldout_fraction)
    boundary = stream.numel() - heldout_blocks * seq_len
    return pack_blocks(stream[:boundary], seq_len), pack_blocks(stream[boundary:], seq_len)


def packed_cache_path(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    heldout_fraction: float = 0.01,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The token file :func:`build_packed_corpus` reads for these settings.

    One token file serves every ``seq_len`` and held-out fraction (blocks are cut when read); the two
    arguments are kept so existing calls work.
    """
    del seq_len, heldout_fraction
    selection = document_selection(
        hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
    )
    return token_file_path(source, tokenizer, cache_dir=cache_dir, **selection)


def build_packed_corpus(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    heldout_fraction: float = 0.01,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> PackedCorpus:
    """Tokenize a corpus into its cached token file (or read it) and copy its blocks into tensors.

    For corpora that fit in memory as int64 blocks; large ones should use
    :func:`lowrank_train.data.open_training_data`, which reads blocks from the file on demand.

    Args:
        source: a corpus source (see :mod:`lowrank_train.data.corpora`).
        tokenizer: the tokenizer; its content (not its name) is part of the cache key.
        seq_len: tokens per block; each starts with BOS when the tokenizer puts one in front of a text
            (:func:`~lowrank_train.data.tokenizer.leading_bos_id`).
        heldout_fraction: share of the token stream held out, from its end.
        hub_config: dataset configuration for hub sources.
        split: dataset split for hub sources.
        text_field: the text field of ``.jsonl`` lines and hub examples.
        max_documents: read at most this many documents.
        cache_dir: folder of the token files; default ``<cache>/tokens``.
        use_cache: read and write the cache; if False the corpus is tokenized into a temporary file.

    Returns:
        The packed corpus.
    """
    check_split_settings(seq_len, heldout_fraction)
    options = document_selection(
        hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
    )
    if use_cache:
        token_file = build_token_file(source, tokenizer, cache_dir=cache_dir, **options)
        return _packed_from_token_file(token_file, seq_len, heldout_fraction, leading_bos_id(tokenizer))
    with tempfile.TemporaryDirectory(prefix="lowrank_train-tokens-") as folder:
        token_file = build_token_file(source, tokenizer, cache_dir=folder, **options)
        return _packed_from_token_file(token_file, seq_len, heldout_fraction, leading_bos_id(tokenizer))


def _packed_from_token_file(
    token_file: TokenFile, seq_len: int, heldout_fraction: float, bos: int | None
) -> PackedCorpus:
    train, heldout = split_token_blocks(token_file.tokens, seq_len, heldout_fraction, bos)
    header = token_file.header
    return PackedCorpus(
        train=train.to_tensor(),
        heldout=heldout.to_tensor(),
        seq_len=seq_len,
        eos_token_id=header.eos_token_id,
        max_token_id=header.max_token_id,
        num_tokens=header.num_tokens,
        source=header.source,
        tokenizer_name=header.tokenizer_name,
    )


def check_vocab_fits(
    max_token_id: int | torch.Tensor, vocab_size: int, *, tokenizer_name: str = "the tokenizer"
) -> None:
    """Raise a ``ValueError`` when token ids would index past a model's embedding table.

    Args:
        max_token_id: the largest token id, or a tensor of token ids of any shape.
        vocab_size: rows of the model's input embedding (``model.config.vocab_size``).
        tokenizer_name: named in the message.
    """
    if isinstance(max_token_id, torch.Tensor):
        max_token_id = int(max_token_id.max()) if max_token_id.numel() else -1
    if max_token_id >= vocab_size:
        raise ValueError(
            f"token ids from {tokenizer_name} go up to {max_token_id}, but the model's vocabulary has only "
            f"{vocab_size} entries (ids 0..{vocab_size - 1}); set the model's vocab_size to at least "
            f"{max_token_id + 1} or use the tokenizer the model was trained with"
        )


def epoch_permutation(num_blocks: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The order of the blocks in one epoch: a ``(num_blocks,)`` permutation fixed by ``(seed, epoch)``.

    Each epoch has its own generator seeded from ``(seed, epoch)``, so any epoch can be drawn directly
    when a run resumes.
    """
    epoch_seed = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(epoch_seed)
    return torch.randperm(num_blocks, generator=generator)


def iterate_batches(
    blocks: torch.Tensor | TokenBlocks,
    batch_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    shuffle: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield ``(batch_size, seq_len)`` batches forever, epoch after epoch, starting at ``start_step``.

    Step ``k`` is always the same batch for the same blocks, batch size and seed, so a run resumed at
    step ``k`` sees exactly the batches an uninterrupted run would have seen. Every epoch uses
    ``num_blocks // batch_size`` batches; the leftover blocks of an epoch are skipped (they are in other
    positions in the next epoch's order).

    Args:
        blocks: ``(N, seq_len)`` token ids: a tensor, or :class:`~lowrank_train.data.blocks.TokenBlocks` read
            from a token file batch by batch.
        batch_size: blocks per batch, at most ``N``.
        seed: fixes the shuffling.
        start_step: index of the first batch to yield (the number of batches already consumed).
        shuffle: if False, every epoch reads the blocks in order.
    """
    num_blocks = blocks.shape[0]
    if batch_size <= 0 or batch_size > num_blocks:
        raise ValueError(f"batch_size must be in [1, {num_blocks}] (the number of blocks), got {batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    steps_per_epoch = num_blocks // batch_size
    epoch, position = divmod(start_step, steps_per_epoch)
    while True:
        order = epoch_permutation(num_blocks, seed=seed, epoch=epoch) if shuffle else torch.arange(num_blocks)
        for step_in_epoch in range(position, steps_per_epoch):
            yield blocks[order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]]
        epoch, position = epoch + 1, 0
