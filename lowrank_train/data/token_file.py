"""A corpus' token stream on disk: a raw ``uint16``/``uint32`` array read through a NumPy memmap, plus a JSON header.

Layout of one cache entry, ``<cache>/tokens/<name>-<key>``:

* ``<name>-<key>.tokens``: the token ids, little-endian, nothing else (so ``np.memmap`` maps it directly);
* ``<name>-<key>.json``: the header: format, dtype, token count, SHA-256 of the ``.tokens`` bytes, EOS id, the
  largest id, the number of documents, and the key (corpus fingerprint + tokenizer fingerprint + how long
  documents were cut into pieces).

The key does not depend on ``seq_len`` or on the held-out fraction: every packing of the corpus reads the same
file. Both files are written to temporary names and renamed into place, the header last: the header's rename is
the commit point, and a header only ever describes a complete token file. A reader checks the header, the file
size and the checksum; :func:`build_token_file` rebuilds an entry that fails any check and logs which file and
why (issue 12, item 3).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from lowrank_train.data.cache import cache_root
from lowrank_train.data.corpora import MAX_PIECE_CHARS, corpus_fingerprint, document_selection, iter_document_pieces
from lowrank_train.data.tokenizer import tokenizer_fingerprint
from lowrank_train.data.tokens import TOKEN_DTYPES, eos_token_id, iter_token_chunks, token_dtype

logger = logging.getLogger(__name__)

# Bump when the layout changes, so old entries are rebuilt instead of misread.
TOKEN_FILE_FORMAT = 1
TOKENS_SUFFIX = ".tokens"
HEADER_SUFFIX = ".json"
_CHECKSUM_BLOCK = 16 << 20  # bytes read per hashing step: bounded memory whatever the file size


class CorruptTokenFileError(ValueError):
    """A token file or its header is missing, truncated, altered, or from another format or key.

    Attributes:
        path: the ``.tokens`` file.
        reason: what is wrong, in words.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"token cache {path} is unusable: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class TokenFileHeader:
    """What the JSON header of a token file records.

    Attributes:
        dtype: ``"<u2"`` or ``"<u4"``.
        num_tokens: length of the token stream.
        sha256: hex SHA-256 of the ``.tokens`` file's bytes.
        eos_token_id: the separator after every document.
        max_token_id: the largest id in the stream (-1 when empty).
        num_documents: documents in the stream.
        source: the corpus source string.
        tokenizer_name: the tokenizer's ``name_or_path``.
        key: the cache key the file was built for.
        format: :data:`TOKEN_FILE_FORMAT`.
    """

    dtype: str
    num_tokens: int
    sha256: str
    eos_token_id: int
    max_token_id: int
    num_documents: int
    source: str
    tokenizer_name: str
    key: str
    format: int = TOKEN_FILE_FORMAT


@dataclass(frozen=True, eq=False)
class TokenFile:
    """An opened, verified token file.

    Attributes:
        path: the ``.tokens`` file.
        header: its header.
        tokens: ``(num_tokens,)`` read-only memmap of the ids (an empty array when there are none).
    """

    path: Path
    header: TokenFileHeader
    tokens: np.ndarray


def header_path(tokens_path: Path) -> Path:
    """The JSON header next to a ``.tokens`` file."""
    return tokens_path.with_suffix(HEADER_SUFFIX)


def token_file_key(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    max_piece_chars: int = MAX_PIECE_CHARS,
) -> str:
    """The cache key of a corpus' token stream: what decides its ids (text, tokenizer, piece length)."""
    parts = {
        "format": TOKEN_FILE_FORMAT,
        "corpus": corpus_fingerprint(
            source, hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
        ),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_piece_chars": max_piece_chars,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def token_file_path(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    max_piece_chars: int = MAX_PIECE_CHARS,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Where :func:`build_token_file` keeps the token stream of a corpus (the ``.tokens`` file)."""
    selection = document_selection(
        hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
    )
    key = token_file_key(source, tokenizer, max_piece_chars=max_piece_chars, **selection)
    return _entry_path(source, tokenizer, key, cache_dir)


def _entry_path(
    source: str, tokenizer: PreTrainedTokenizerBase, key: str, cache_dir: str | os.PathLike[str] | None
) -> Path:
    """The ``.tokens`` file of the cache entry ``key``: a readable name, then the key's start."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokens"
    readable = _slug(f"{Path(source).name or source}-{Path(tokenizer.name_or_path).name}")
    return folder / f"{readable}-{key[:16]}{TOKENS_SUFFIX}"


def build_token_file(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    max_piece_chars: int = MAX_PIECE_CHARS,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TokenFile:
    """Open the cached token stream of a corpus, or tokenize the corpus into it (once, in bounded memory).

    An entry that fails verification (missing header, size that disagrees with it, wrong checksum, another
    key or format) is deleted and rebuilt, with a warning that names the file and the reason.

    Args:
        source: a corpus source (see :mod:`lowrank_train.data.corpora`).
        tokenizer: the tokenizer; its content (not its name) is part of the key.
        hub_config: dataset configuration for hub sources.
        split: dataset split for hub sources.
        text_field: the text field of ``.jsonl`` lines and hub examples.
        max_documents: read at most this many documents.
        max_piece_chars: longer documents are tokenized in pieces of at most this many characters.
        cache_dir: folder of the cache entries; default ``<cache>/tokens``.

    Returns:
        The verified token file.
    """
    selection = document_selection(
        hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
    )
    key = token_file_key(source, tokenizer, max_piece_chars=max_piece_chars, **selection)
    path = _entry_path(source, tokenizer, key, cache_dir)
    try:
        opened = read_token_file(path, key=key)
        logger.info("reading %d tokens of %s from %s", opened.header.num_tokens, source, path)
        return opened
    except FileNotFoundError:
        pass
    except CorruptTokenFileError as error:
        logger.warning("%s; deleting it and tokenizing %s again", error, source)
        remove_token_file(path)
    logger.info("tokenizing %s with %s into %s", source, tokenizer.name_or_path, path)
    pieces = iter_document_pieces(source, max_piece_chars=max_piece_chars, **selection)
    return write_token_file(
        path,
        iter_token_chunks(pieces, tokenizer),
        dtype=token_dtype(len(tokenizer)),
        eos_token_id=eos_token_id(tokenizer),
        source=source,
        tokenizer_name=str(tokenizer.name_or_path),
        key=key,
    )


def write_token_file(
    path: Path,
    chunks: Iterable[np.ndarray],
    *,
    dtype: np.dtype,
    eos_token_id: int,
    source: str,
    tokenizer_name: str,
    key: str,
) -> TokenFile:
    """Stream token chunks into ``path`` and its header, atomically; the header's rename commits the entry.

    Args:
        path: the ``.tokens`` file to create (its folder is created).
        chunks: ``(t,)`` integer arrays whose concatenation is the token stream.
        dtype: one of :data:`lowrank_train.data.tokens.TOKEN_DTYPES`.
        eos_token_id: the document separator (counted as documents in the header).
        source: recorded in the header.
        tokenizer_name: recorded in the header.
        key: the cache key, recorded and checked by :func:`read_token_file`.

    Returns:
        The written file, opened.
    """
    dtype = np.dtype(dtype)
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token files hold {[d.str for d in TOKEN_DTYPES]}, not {dtype.str}")
    limit = int(np.iinfo(dtype).max)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_orphaned_temporaries(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise OSError(
            f"cannot write the token cache in {folder}: {error}; set data.cache_dir to a writable folder"
        ) from error
    header_temporary = Path(f"{temporary}{HEADER_SUFFIX}")
    digest = hashlib.sha256()
    num_tokens = num_documents = 0
    max_token_id = -1
    try:
        with os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                if chunk.size == 0:
                    continue
                chunk_max = int(chunk.max())
                if chunk_max > limit or int(chunk.min()) < 0:
                    raise ValueError(f"token id {chunk_max} does not fit the token file's dtype {dtype.str}")
                data = np.ascontiguousarray(chunk, dtype=dtype).tobytes()
                digest.update(data)
                with _writing(path):
                    out.write(data)
                num_tokens += chunk.size
                num_documents += int(np.count_nonzero(chunk == eos_token_id))
                max_token_id = max(max_token_id, chunk_max)
            with _writing(path):
                out.flush()
                os.fsync(out.fileno())
        header = TokenFileHeader(
            dtype=dtype.str,
            num_tokens=num_tokens,
            sha256=digest.hexdigest(),
            eos_token_id=int(eos_token_id),
            max_token_id=max_token_id,
            num_documents=num_documents,
            source=source,
            tokenizer_name=tokenizer_name,
            key=key,
        )
        with _writing(path), header_temporary.open("w", encoding="utf-8") as out:
            json.dump(asdict(header), out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        with _writing(path):
            os.replace(temporary, path)
            os.replace(header_temporary, header_path(path))
    finally:
        for leftover in (Path(temporary), header_temporary):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    logger.info("wrote %d tokens (%d documents, %s) to %s", num_tokens, num_documents, dtype.str, path)
    return TokenFile(path=path, header=header, tokens=_map(path, header))


def read_token_file(path: Path, *, key: str | None = None, verify: bool = True) -> TokenFile:
    """Open a token file after checking its header, its size and (with ``verify``) its checksum.

    Args:
        path: the ``.tokens`` file.
        key: when given, the header must record this key.
        verify: hash the whole file (about 2 s per GB) and compare with the header.

    Raises:
        FileNotFoundError: neither the token file nor its header exists.
        CorruptTokenFileError: anything else is wrong; the message names the file.
    """
    header_file = header_path(path)
    if not header_file.exists():
        if path.exists():
            raise CorruptTokenFileError(path, f"its header {header_file.name} is missing (an interrupted write?)")
        raise FileNotFoundError(f"no token file at {path}")
    header = _read_header(path, header_file)
    if key is not None and header.key != key:
        raise CorruptTokenFileError(path, "its header was written for another corpus or tokenizer (key mismatch)")
    if not path.exists():
        raise CorruptTokenFileError(path, "the token file is missing next to its header")
    expected = header.num_tokens * np.dtype(header.dtype).itemsize
    size = path.stat().st_size
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise CorruptTokenFileError(
            path, f"{state}: {size} bytes, the header records {header.num_tokens} tokens = {expected} bytes"
        )
    if verify:
        digest = _file_sha256(path)
        if digest != header.sha256:
            raise CorruptTokenFileError(
                path, f"checksum mismatch: sha256 {digest}, the header records {header.sha256}"
            )
    return TokenFile(path=path, header=header, tokens=_map(path, header))


def remove_token_file(path: Path) -> None:
    """Delete a token file and its header, whichever exist."""
    for file in (header_path(path), path):  # the header first: never leave a header without its tokens
        with contextlib.suppress(FileNotFoundError):
            file.unlink()


def _read_header(path: Path, header_file: Path) -> TokenFileHeader:
    try:
        raw: Any = json.loads(header_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptTokenFileError(path, f"its header {header_file.name} is not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise CorruptTokenFileError(path, f"its header {header_file.name} is not a JSON object")
    if raw.get("format") != TOKEN_FILE_FORMAT:
        raise CorruptTokenFileError(
            path, f"header format {raw.get('format')!r}, this version reads {TOKEN_FILE_FORMAT}"
        )
    types = {"dtype": str, "sha256": str, "source": str, "tokenizer_name": str, "key": str}
    types.update(dict.fromkeys(("num_tokens", "eos_token_id", "max_token_id", "num_documents"), int))
    for field, kind in types.items():
        if not isinstance(raw.get(field), kind) or isinstance(raw.get(field), bool):
            raise CorruptTokenFileError(path, f"its header has no valid {field!r} field")
    if raw["dtype"] not in {d.str for d in TOKEN_DTYPES} or raw["num_tokens"] < 0:
        raise CorruptTokenFileError(path, f"its header records dtype {raw['dtype']!r}, {raw['num_tokens']} tokens")
    return TokenFileHeader(**{field: raw[field] for field in (*types, "format")})


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Name the cache entry in an OS error while writing it (a full disk, a read-only folder)."""
    try:
        yield
    except OSError as error:
        raise OSError(f"could not write the token cache {path}: {error}") from error


def _map(path: Path, header: TokenFileHeader) -> np.ndarray:
    dtype = np.dtype(header.dtype)
    if header.num_tokens == 0:
        return np.empty(0, dtype=dtype)  # a zero-length file cannot be memory-mapped
    return np.memmap(path, dtype=dtype, mode="r", shape=(header.num_tokens,))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHECKSUM_BLOCK)
    view = memoryview(buffer)
    with path.open("rb") as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def _remove_orphaned_temporaries(path: Path) -> None:
    """Delete temporary files of this entry left by builders that died (their pid no longer runs)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\..*\.tmp(\{HEADER_SUFFIX})?$")
    for candidate in path.parent.glob(f".{path.name}.*.tmp*"):
        match = pattern.match(candidate.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "corpus"
