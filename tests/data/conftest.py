"""Fixtures for the data tests: a private cache folder and the offline GPT-2 tokenizer."""

import pytest

from lowrank_train.data.cache import CACHE_ENV_VAR


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """A cache folder shared by the tests of one session (the tokenizer is built into it once)."""
    return tmp_path_factory.mktemp("lowrank_train_cache")


@pytest.fixture
def cache(session_cache, monkeypatch):
    """Point ``$LOWRANK_TRAIN_CACHE`` at the session's private cache folder."""
    monkeypatch.setenv(CACHE_ENV_VAR, str(session_cache))
    return session_cache


@pytest.fixture(scope="session")
def gpt2_tokenizer(session_cache):
    """The offline GPT-2 tokenizer, built once per session in the private cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV_VAR, str(session_cache))
        from lowrank_train.data.tokenizer import load_tokenizer

        return load_tokenizer("gpt2-offline")
