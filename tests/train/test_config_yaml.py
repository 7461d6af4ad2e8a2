"""YAML loading (issue 20 item 6): a key or section given twice is an error naming it, both lines and the file."""

from pathlib import Path

import pytest
import yaml

from lowrank_train.train import ConfigError, load_config, parse_overrides
from lowrank_train.train.config_schema import UniqueKeyLoader, load_yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes/configs/demo.yaml"

# (YAML text, words the error must hold)
DUPLICATES = [
    (
        "optimizer:\n  name: qgalore\nrun:\n  max_steps: 3\noptimizer:\n  name: adamw\n",
        ["'optimizer'", "line 1", "line 5"],
    ),
    ("optimizer:\n  name: qgalore\n  lr: 0.01\n  lr: 0.001\n", ["'optimizer.lr'", "line 3", "line 4"]),
    ("run: {max_steps: 3, max_steps: 4}\n", ["'run.max_steps'", "column 7", "column 21"]),
    ("run:\n  metrics:\n    - {a: 1, a: 2}\n", ["'run.metrics[0].a'", "line 3"]),
    ("0x10: a\n16: b\n", ["'16'", "line 1", "line 2"]),  # the same integer key, spelled twice
]


@pytest.mark.parametrize(("text", "words"), DUPLICATES, ids=range(len(DUPLICATES)))
def test_repeated_key_names_key_lines_and_source(text, words):
    with pytest.raises(ConfigError) as info:
        load_yaml(text, source="recipe.yaml")
    message = str(info.value)
    for word in ["recipe.yaml", "twice", *words]:
        assert word in message, (word, message)


def test_plain_yaml_still_loads_as_safe_load():
    text = "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\nsame: *b\n'1': s\n1: i\nempty:\n"
    assert load_yaml(text) == yaml.safe_load(text)  # merge keys may be overridden; "1" and 1 are two keys
    assert load_yaml("") is None
    with pytest.raises(yaml.constructor.ConstructorError):  # still safe: no Python objects
        yaml.load("!!python/object/apply:os.getcwd []", Loader=UniqueKeyLoader)


def test_section_appended_to_a_recipe_is_refused(tmp_path):
    # The incident: a second optimizer section at the end of a Q-GaLore recipe silently trained AdamW.
    text = DEMO.read_text(encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(text + "\noptimizer:\n  name: adamw\n  lr: 1.0e-3\n", encoding="utf-8")
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("optimizer:"))
    last = len(path.read_text(encoding="utf-8").splitlines()) - 2
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "'optimizer'" in message
    assert f"line {first}" in message and f"line {last}" in message, message


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_override_values_refuse_repeated_keys_and_bad_yaml():
    with pytest.raises(ConfigError, match="'run.metrics.a' is given twice"):
        parse_overrides(["run.metrics={a: 1, a: 2}"])
    with pytest.raises(ConfigError, match=r"override 'run.metrics=\[1,' is not valid YAML"):
        parse_overrides(["run.metrics=[1,"])


def test_repeated_overrides_keep_the_last_and_sections_merge():
    # Documented last-wins, as command-line flags: an override appended to a command replaces an earlier one.
    assert parse_overrides(["run.max_steps=3", "run.max_steps=7"]) == {"run": {"max_steps": 7}}
    merged = parse_overrides(["optimizer.lr=0.5", "optimizer={name: galore}", "optimizer.rank=8"])
    assert merged == {"optimizer": {"lr": 0.5, "name": "galore", "rank": 8}}
    config = load_config(DEMO, ["optimizer.lr=0.5", "optimizer.lr=0.25"])
    assert config.optimizer.lr == 0.25
