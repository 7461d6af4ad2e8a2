"""Fixtures for the training-loop tests: a private cache and overrides that shrink any recipe to a few seconds."""

import pytest

from lowrank_train.data.cache import CACHE_ENV_VAR


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory):
    """A cache folder shared by this session's tests (tokenizer and packed corpus are built into it once)."""
    return tmp_path_factory.mktemp("lowrank_train_cache")


TINY_OVERRIDES = [
    "run.max_steps=4",
    "run.log_every=1",
    "run.eval_every=2",
    "run.eval_batches=1",
    "run.device=cpu",
    "run.num_threads=1",
    "model.pretrained=null",
    "model.vocab_size=50257",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_position_embeddings=32",
    "model.tie_embeddings=true",
    "data.corpus=kjv",
    "data.tokenizer=gpt2-offline",
    "data.max_documents=1",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.grad_accum=1",
    "data.heldout_fraction=0.05",
    "optimizer.rank=8",
    "optimizer.update_gap=2",
    "schedule.warmup_steps=1",
]
"""A 2-layer, width-32 LLaMA on the first book of the KJV, 32-token sequences, 4 steps (no output folder)."""


@pytest.fixture(scope="session")
def tiny_overrides():
    """TINY_OVERRIDES, for fixtures wider than one test (``tiny`` needs a test's tmp_path)."""
    return list(TINY_OVERRIDES)


@pytest.fixture
def tiny(train_cache, tmp_path, monkeypatch):
    """Overrides for a 2-layer, width-32 LLaMA on the first book of the KJV, 32-token sequences, 4 steps."""
    monkeypatch.setenv(CACHE_ENV_VAR, str(train_cache))
    return [f"run.output_dir={tmp_path / 'run'}", *TINY_OVERRIDES]
