"""A model out of every run: the final Hugging Face folder and ``lowrank-train export`` against the trained model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowrank_train.cli import main
from lowrank_train.nn import QuantLinear
from lowrank_train.train import load_config, load_state, train
from lowrank_train.train.evaluation import evaluate
from lowrank_train.train.export import checkpoint_folder, export_checkpoint
from lowrank_train.train.model import build_model
from lowrank_train.train.setup import load_run_data, load_run_tokenizer, prepare_model, resolve_dtype


def trained_model(run_dir, step=None):
    """The model of a checkpoint as the run held it (QuantLinear layers included), rebuilt by hand."""
    folder = checkpoint_folder(run_dir, step)
    config = load_config(run_dir / "config.yaml")
    dtype = resolve_dtype(config.run.dtype)
    model, _ = build_model(
        config.model,
        dtype,
        weight_bits=config.optimizer.resolved_weight_bits,
        weight_group_size=config.optimizer.weight_group_size,
    )
    model = prepare_model(model, config, torch.device("cpu"))
    model.load_state_dict(load_state(folder)["model"])
    return model.eval(), config


def ids(config, n=2):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.model.vocab_size, (n, config.data.seq_len), generator=generator)


@pytest.mark.parametrize(
    ("name", "dtype", "atol"), [("qgalore", "float32", 1e-5), ("adamw", "float32", 0.0), ("qgalore", "bfloat16", 0.0)]
)
def test_final_folder_loads_with_the_same_logits(tiny, tmp_path, name, dtype, atol):
    config = load_config(None, [*tiny, f"optimizer.name={name}", f"run.dtype={dtype}", "run.memory_table=false"])
    summary = train(config, log=lambda line: None)
    run_dir = tmp_path / "run"
    folder = run_dir / "model"
    assert summary["model_folder"] == str(folder)
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()

    reference, config = trained_model(run_dir)
    quantized = any(isinstance(m, QuantLinear) for m in reference.modules())
    assert quantized == (name == "qgalore")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype)).eval()
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())
    assert all(p.dtype == resolve_dtype(dtype) for p in loaded.parameters())
    batch = ids(config)
    with torch.no_grad():
        expected, got = reference(input_ids=batch).logits, loaded(input_ids=batch).logits
    torch.testing.assert_close(got, expected, atol=atol, rtol=0 if atol == 0 else 1e-5)
    if dtype == "float32":
        # The reloaded model reproduces the run's own final held-out loss.
        tokenizer = load_run_tokenizer(config.data.tokenizer, None)
        heldout = load_run_data(config, tokenizer, config.model.vocab_size).heldout
        loss = evaluate(loaded, heldout, config.data.batch_size, config.run.eval_batches, torch.device("cpu"))
        assert loss == pytest.approx(summary["final_eval_loss"], abs=1e-5)


def test_export_any_checkpoint_through_the_cli(tiny, tmp_path, capsys):
    overrides = [*tiny, "optimizer.name=qgalore", "run.save_every=2", "run.keep_checkpoints=2"]
    assert main(["pretrain", "recipes/configs/demo.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert out.splitlines()[0] == f"run folder: {run_dir.resolve()}"
    assert out.strip().splitlines()[-1].startswith(f"run folder: {run_dir.resolve()} (model in model/")

    target = tmp_path / "step2"
    assert main(["export", str(run_dir), "--step", "2", "--out", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    reference, config = trained_model(run_dir, step=2)
    final, _ = trained_model(run_dir)
    loaded = AutoModelForCausalLM.from_pretrained(target).eval()
    batch = ids(config)
    with torch.no_grad():
        expected = reference(input_ids=batch).logits
        torch.testing.assert_close(loaded(input_ids=batch).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(final(input_ids=batch).logits, expected)  # step 2 is not the final model

    # Without --step: the newest checkpoint into <run>/model, the same as the folder the run wrote.
    (run_dir / "model").rename(tmp_path / "from_run")
    assert main(["export", str(run_dir)]) == 0
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "from_run").state_dict()
    second = AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_export_names_what_is_missing(tiny, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = load_config(None, [*tiny, "optimizer.name=adamw", "run.max_steps=2", "run.memory_table=false"])
    train(config, log=lambda line: None)
    assert main(["export", str(tmp_path / "run"), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 7" in err and "[2]" in err
    meta = json.loads((checkpoint_folder(tmp_path / "run") / "meta.json").read_text())
    assert meta["step"] == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
        export_checkpoint(tmp_path / "run", step=3)
