"""``lowrank-train compress``: the numbers it reports are those of the models it starts from and saves."""

import json

import pytest
import torch

from lowrank_train.train import build_model, compress, evaluate, load_config
from lowrank_train.train.model import count_parameters
from lowrank_train.train.setup import load_run_data, load_run_tokenizer
from lowrank_train.welore.compress import PHASES


def test_compress_reports_the_saved_models_heldout_loss(tiny, tmp_path):
    from lowrank_train.welore import load_compressed, lowrank_layers

    shapes = load_config(None, [o for o in tiny if o.startswith(("model.", "data."))])
    torch.manual_seed(0)
    dense, _ = build_model(shapes.model)
    dense.save_pretrained(tmp_path / "dense")
    config = load_config(
        None,
        [*tiny, f"model.pretrained={tmp_path / 'dense'}", "compress.target=0.3", "compress.calibration_sequences=4"],
    )
    lines = []
    summary = compress(config, log=lines.append)

    # An independent evaluation of the dense model and of the saved compressed one on the same held-out blocks.
    tokenizer = load_run_tokenizer(config.data.tokenizer, None)
    heldout = load_run_data(config, tokenizer, dense.get_input_embeddings().num_embeddings).heldout
    saved = load_compressed(summary["model_dir"])
    cpu = torch.device("cpu")
    batch, batches = config.data.batch_size, config.run.eval_batches
    assert summary["eval_loss_before"] == pytest.approx(evaluate(dense, heldout, batch, batches, cpu), rel=1e-6)
    assert summary["eval_loss_after"] == pytest.approx(evaluate(saved, heldout, batch, batches, cpu), rel=1e-6)
    assert summary["parameters_before"] == count_parameters(dense)
    assert summary["parameters_after"] == count_parameters(saved) < count_parameters(dense)
    assert lowrank_layers(saved) and summary["report"]
    assert (tmp_path / "run" / "model" / "tokenizer_config.json").is_file()  # ready for finetune's tokenizer=model

    # The default strategy=auto: which candidate won and by how much, in the log and in compress_report.json.
    report = json.loads((tmp_path / "run" / "compress_report.json").read_text())
    guard = report["guard"]
    assert guard["winner"] == report["strategy"] and set(guard["losses"]) == {"whitened", "whitened-loss"}
    assert any(line.startswith(f"guard: {guard['winner']!r} won by") for line in lines)
    assert guard["margin"] == pytest.approx(max(guard["losses"].values()) - min(guard["losses"].values()))
    by_type = report["by_type"]
    assert sum(entry["matrices"] for entry in by_type.values()) == len(report["matrices"])
    assert all(entry["lrc"] + entry["dense"] == entry["matrices"] == len(entry["ranks"]) for entry in by_type.values())

    # Progress (issue 24 item 2): each phase ends with a plain line off a terminal; the report times them.
    done = [line.split(" done in ")[0] for line in lines if " done in " in line]
    assert done[0] == "evaluation" and done[-1] == "evaluation"
    assert {"calibration", "spectra", "allocation", "factors", "guard"} <= set(done)
    assert set(report["phase_seconds"]) == {*PHASES, "evaluation"}
    assert sum(report["phase_seconds"].values()) <= report["seconds"]
    assert report["peak_memory_bytes"] > 0
