"""Tokenize a corpus, pack it into fixed-length blocks, cache the blocks, and serve resumable batches.

The token stream is every document's tokens followed by the tokenizer's EOS token, concatenated in
corpus order. The held-out split is the *tail* of that stream (a separate region of the text, never
interleaved with training blocks); both regions are cut into ``seq_len`` blocks, dropping the
remainder. Blocks are cached as a safetensors file keyed by the corpus, the tokenizer's content and
the packing settings, so a second run with the same settings skips tokenization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from lowrank_train.data.cache import cache_root
from lowrank_train.data.corpora import corpus_fingerprint, iter_documents

logger = logging.getLogger(__name__)

# Bump when the packing layout changes, so old cache files are not read as new ones.
PACKING_FORMAT_VERSION = 1


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
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    total_blocks = stream.numel() // seq_len
    heldout_blocks = 0
    if heldout_fraction > 0:
        heldout_blocks = max(1, round(heldout_fraction * stream.numel() / seq_len))
    if total_blocks - heldout_blocks < 1:
        raise ValueError(
            f"the corpus has {stream.numel()} tokens: too few for one training block of {seq_len} tokens plus "
            f"{heldout_blocks} held-out block(s); use a larger corpus or a shorter seq_len"
        )
    boundary = stream.numel() - heldout_blocks * seq_len
    return pack_blocks(stream[:boundary], seq_len), pack_blocks(stream[boundary:], seq_len)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the token ids: the tokenizer's model, normaliser, pre-tokeniser and EOS."""
    digest = hashlib.sha256()
    digest.update(f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer.eos_token_id}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The serialized tokenizer starts with the per-call truncation and padding settings, which do not
        # change token ids; hash from the first field after them (re-serializing the ~1.5 MB JSON is slow).
        serialized = backend.to_str()
        start = serialized.find('"added_tokens":')
        if start < 0:
            state = json.loads(serialized)
            state.pop("truncation", None)
            state.pop("padding", None)
            serialized, start = json.dumps(state, sort_keys=True), 0
        digest.update(serialized[start:].encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


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
    """Where :func:`build_packed_corpus` caches the blocks for these settings."""
    key_parts = {
        "format": PACKING_FORMAT_VERSION,
        "corpus": corpus_fingerprint(
            source, hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
        ),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "heldout_fraction": heldout_fraction,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "packed"
    readable = _slug(f"{Path(source).name or source}-{Path(tokenizer.name_or_path).name}")
    return folder / f"{readable}-L{seq_len}-{key}.safetensors"


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
    """Tokenize and pack a corpus, or load the blocks from the cache when they were built before.

    Args:
        source: a corpus source (see :mod:`lowrank_train.data.corpora`).
        tokenizer: the tokenizer; its content (not its name) is part of the cache key.
        seq_len: tokens per block.
        heldout_fraction: share of the token stream held out, from its end.
        hub_config: dataset configuration for hub sources.
        split: dataset split for hub sources.
        text_field: the text field of ``.jsonl`` lines and hub examples.
        max_documents: read at most this many documents.
        cache_dir: folder of the cache files; default ``<cache>/packed``.
        use_cache: read and write the cache.

    Returns:
        The packed corpus.
    """
    path = packed_cache_path(
        source,
        tokenizer,
        seq_len,
        heldout_fraction=heldout_fraction,
        hub_config=hub_config,
        split=split,
        text_field=text_field,
        max_documents=max_documents,
        cache_dir=cache_dir,
    )
    if use_cache and path.exists():
        logger.info("loading packed corpus from %s", path)
        return _read_packed(path)

    logger.info("tokenizing %s with %s", source, tokenizer.name_or_path)
    documents = iter_documents(
        source, hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
    )
    stream = tokenize_documents(documents, tokenizer)
    train, heldout = split_train_heldout(stream, seq_len, heldout_fraction)
    packed = PackedCorpus(
        train=train,
        heldout=heldout,
        seq_len=seq_len,
        eos_token_id=int(tokenizer.eos_token_id),
        max_token_id=int(stream.max()),
        num_tokens=stream.numel(),
        source=source,
        tokenizer_name=str(tokenizer.name_or_path),
    )
    if use_cache:
        _write_packed(path, packed)
    return packed


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
    blocks: torch.Tensor,
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
        blocks: ``(N, seq_len)`` token ids.
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "corpus"


def _write_packed(path: Path, packed: PackedCorpus) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": str(PACKING_FORMAT_VERSION),
        "seq_len": str(packed.seq_len),
        "eos_token_id": str(packed.eos_token_id),
        "max_token_id": str(packed.max_token_id),
        "num_tokens": str(packed.num_tokens),
        "source": packed.source,
        "tokenizer_name": packed.tokenizer_name,
    }
    # Write to a temporary file and rename, so an interrupted run never leaves a truncated cache entry.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file({"train": packed.train.contiguous(), "heldout": packed.heldout.contiguous()}, temporary, metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _read_packed(path: Path) -> PackedCorpus:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    return PackedCorpus(
        train=tensors["train"],
        heldout=tensors["heldout"],
        seq_len=int(metadata["seq_len"]),
        eos_token_id=int(metadata["eos_token_id"]),
        max_token_id=int(metadata["max_token_id"]),
        num_tokens=int(metadata["num_tokens"]),
        source=metadata["source"],
        tokenizer_name=metadata["tokenizer_name"],
    )
