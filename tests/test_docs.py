"""Docs that run (issue 15 item 8): every ```python block of README.md and recipes/README.md, as written.

A block may be preceded (on the line above its fence) by an HTML comment for this harness:

* ``<!-- test: setup=NAME -->``: the block runs after the setup ``NAME`` below, which defines the names the
  block uses but does not build (``model``, ``loader``...) at tiny shapes. A line ``name = ...`` in the block is
  the reader's placeholder for such a name: the setup's value is used instead, and a placeholder the setup does
  not define is an error.
* ``<!-- test: skip REASON -->``: not run (only for what one CPU process cannot do); kept to a few.

Blocks run in a fresh namespace holding only the setup's names, so a missing import (``torch``, ``fully_shard``)
fails the test, inside a temporary working directory, and with the optimizer registry restored afterwards.
The presets' docstrings are checked against the one option schema.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import pydoc
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from lowrank_train.integrations.transformers import LowRankOptimizerConfig
from lowrank_train.optim import (
    GaLore,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    QGaLoreAdamW4bit,
    QGaLoreAdamW8bit,
    registry,
)
from lowrank_train.optim.options import GROUP_OPTIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "recipes/README.md")
MAX_SKIPS = 2  # skips stay few and explicit
_FENCE = re.compile(r"^(?P<indent>\s*)```python\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*test:\s*(?P<body>.*?)\s*-->\s*$")
_PLACEHOLDER = re.compile(r"^(?P<indent>\s*)(?P<name>[A-Za-z_]\w*)\s*=\s*\.\.\.\s*(#.*)?$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: str
    line: int  # 1-based line of the first code line
    code: str
    setup: str | None = None
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def extract_blocks(path: str) -> list[Block]:
    """The ```python blocks of ``path`` (indented ones in list items included), with their directives."""
    lines = (ROOT / path).read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent = fence["indent"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path}:{i + 1}: a ```python block is never closed")
        code = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end])
        setup = skip = None
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        directive = _DIRECTIVE.match(previous)
        if directive:
            body = directive["body"]
            if body.startswith("setup="):
                setup = body.removeprefix("setup=").strip()
            elif body.startswith("skip"):
                skip = body.removeprefix("skip").strip() or "no reason given"
            else:
                raise AssertionError(f"{path}:{i}: unknown test directive {body!r} (setup=NAME or skip REASON)")
        blocks.append(Block(path, i + 2, code + "\n", setup, skip))
        i = end + 1
    return blocks


# ----- setups: the names a block uses but does not build, at tiny shapes -------------------------------------
def _tiny_llama() -> torch.nn.Module:
    """A 1-layer LLaMA wide enough (160) for the README's rank=128, vocab 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=160,
        intermediate_size=320,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 16), generator=generator)
    return {"input_ids": ids, "labels": ids}


@contextlib.contextmanager
def tiny_llama_setup(tmp_path: pathlib.Path) -> Iterator[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    yield {
        "model": _tiny_llama(),
        "loader": [_batch(generator) for _ in range(2)],
        "batches": [_batch(generator) for _ in range(8)],
        "token_ids": torch.randint(0, 256, (4, 32), generator=generator),
    }


@contextlib.contextmanager
def fsdp_setup(tmp_path: pathlib.Path) -> Iterator[dict[str, Any]]:
    """One CPU process as a whole (gloo) world, so fully_shard and FSDP2GaLore run as in a torchrun job."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield {"model": _tiny_llama()}
    finally:
        from lowrank_train.train.parallel import end_process_group

        end_process_group()


SETUPS: dict[str, Callable[[pathlib.Path], contextlib.AbstractContextManager[dict[str, Any]]]] = {
    "tiny_llama": tiny_llama_setup,
    "fsdp": fsdp_setup,
}


def fill_placeholders(block: Block, values: dict[str, Any]) -> str:
    """Replaces each ``name = ...`` line by a no-op (same line numbers); the setup provides ``name``."""
    lines = []
    for number, line in enumerate(block.code.splitlines(), start=block.line):
        placeholder = _PLACEHOLDER.match(line)
        if placeholder:
            if placeholder["name"] not in values:
                raise AssertionError(
                    f"{block.path}:{number}: placeholder {placeholder['name']!r} but the block's setup "
                    f"({block.setup!r}) does not define it: add <!-- test: setup=NAME --> above the block"
                )
            line = f"{placeholder['indent']}pass  # {placeholder['name']}: from the test setup"
        lines.append(line)
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def registry_restored() -> Iterator[None]:
    """A block that registers an optimizer method (README's registry example) leaves the registry as it was."""
    saved = dict(registry._REGISTRY)
    try:
        yield
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


BLOCKS = [block for path in DOCS for block in extract_blocks(path)]


def test_the_docs_have_python_blocks():
    """The extractor finds the README's blocks (a broken fence pattern must not pass by finding none)."""
    assert len([b for b in BLOCKS if b.path == "README.md"]) >= 5
    assert {b.setup for b in BLOCKS} - {None} <= set(SETUPS), "a directive names an unknown setup"
    assert sum(b.skip is not None for b in BLOCKS) <= MAX_SKIPS


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(tmp_path)  # blocks may write files ("out/")
    setup = SETUPS[block.setup](tmp_path) if block.setup else contextlib.nullcontext({})
    with setup as values, registry_restored():
        namespace = {"__name__": "__docs__", **values}
        exec(compile(fill_placeholders(block, values), f"{ROOT / block.path}", "exec"), namespace)


def test_fill_placeholders_needs_a_setup():
    block = Block("README.md", 10, "model = ...  # any nn.Module\nprint(model)\n")
    assert fill_placeholders(block, {"model": 1}).splitlines()[0].startswith("pass")
    with pytest.raises(AssertionError, match="placeholder 'model'"):
        fill_placeholders(block, {})


def test_missing_import_fails_a_block(tmp_path, monkeypatch):
    """The harness's namespace holds no torch: a block that uses torch without importing it fails."""
    block = Block("README.md", 1, "x = torch.zeros(1)\n")
    with pytest.raises(NameError, match="torch"):
        test_python_block_runs_as_written(block, tmp_path, monkeypatch)


# ----- docstrings (help(GaLoreAdamW) shows the options) ------------------------------------------------------
PRESETS = [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor, QGaLoreAdamW8bit, QGaLoreAdamW4bit]


@pytest.mark.parametrize("cls", [GaLore, *PRESETS, LowRankOptimizerConfig], ids=lambda c: c.__name__)
def test_help_lists_every_group_option(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    missing = [name for name in GROUP_OPTIONS if f"{name}" not in text]
    assert not missing, f"help({cls.__name__}) does not mention {missing}"
    for option in GROUP_OPTIONS.values():
        if option.name == "rank" and cls is LowRankOptimizerConfig:
            continue  # the config documents its own rank (it has a default there: 128)
        assert " ".join(option.doc.split())[:40] in " ".join(text.split()), (cls.__name__, option.name)


@pytest.mark.parametrize("cls", PRESETS, ids=lambda c: c.__name__)
def test_each_preset_points_to_galore(cls):
    assert ":class:`~lowrank_train.optim.GaLore`" in cls.__doc__
    assert issubclass(cls, GaLore)
