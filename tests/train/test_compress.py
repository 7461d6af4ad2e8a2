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

    # Evaluation progress (issue 24): per batch, before and after, nothing per matrix.
    batches = min(-(-heldout.shape[0] // batch), batches)
    for when in ("before", "after"):
        assert f"evaluation: {batches} batches ({when} compression)" in lines
    assert sum(line.startswith("evaluation 1/") and " | ETA " in line for line in lines) == 2 * (batches > 1)
    assert not any("layers.0" in line for line in lines)

    # The closing report: every number it prints is in compress_report.json.
    closing = lines[[n for n, line in enumerate(lines) if line.startswith("after: ")][0] :]
    table = closing[1].splitlines()
    assert table[0].split()[:4] == ["type", "matrices", "LRC", "dense"]
    assert sorted(row.split()[0] for row in table[1:]) == sorted(by_type)
    for row in table[1:]:
        cells = row.split()
        entry = by_type[cells[0]]
        assert cells[1:4] == [str(entry["matrices"]), str(entry["lrc"]), str(entry["dense"])]
        assert f"{entry['mean_rank']:.0f} ({min(entry['ranks'])}-{max(entry['ranks'])})" in row
        energy = entry["calibration_energy"]
        assert f"{energy['min']:.3f} / {energy['mean']:.3f}" in row
        of_type = [m["calibration_energy"] for m in report["matrices"] if m["name"].rsplit(".", 1)[-1] == cells[0]]
        assert energy["min"] == min(of_type) and len(of_type) == entry["matrices"]
    assert closing[2] == f"{report['strategy']}: target 0.30" + closing[2].split(": target 0.30", 1)[1]
    assert closing[3].startswith(f"guard: {guard['winner']!r} won by {guard['margin']:.4f} nats")
    assert all(f"{name} {loss:.4f}" in closing[3] for name, loss in guard["losses"].items())
    timing = closing[4]
    assert timing.startswith("seconds: ") and f"total {report['seconds']:.1f} s" in timing
    assert all(f"{name} {seconds:.1f}" in timing for name, seconds in report["phase_seconds"].items() if seconds)
    assert f"peak RSS {report['peak_memory_bytes'] / 2**30:.2f} GiB" in timing
    assert closing[-1].startswith("compressed model saved to ") and "compress_report.json" in closing[-1]


def test_per_matrix_rows_only_when_asked():
    """``--per-matrix``: one row per matrix between the table per type and the summary line, each row that
    matrix's numbers; without it the closing report names no matrix."""
    from lowrank_train.cli import build_parser
    from lowrank_train.train.compress_run import closing_report
    from lowrank_train.welore import CompressionReport
    from lowrank_train.welore.compress import MatrixReport

    matrices = (
        MatrixReport("model.layers.0.self_attn.q_proj", (64, 64), 64, 20, 20, True, 4096, 2560, 0.91),
        MatrixReport("model.layers.0.mlp.down_proj", (64, 172), 64, 60, 64, False, 11008, 11008, None),
        MatrixReport("model.layers.1.self_attn.q_proj", (64, 64), 64, 9, 9, True, 4096, 1152, 0.8765),
    )
    report = CompressionReport("whitened", 0.3, 0.1, 0.5, matrices)
    summary = {"eval_loss_after": 2.0, "parameters_before": 20000, "parameters_after": 15000, "perplexity_before": 6.0}
    timing = {"phase_seconds": {"spectra": 1.0}, "seconds": 2.0, "peak_memory_bytes": 2**30}
    cpu = torch.device("cpu")
    plain = closing_report(report, summary, timing, cpu)
    assert not any("layers." in line for line in plain)
    listed = closing_report(report, summary, timing, cpu, per_matrix=True)
    assert listed[:2] == plain[:2] and listed[3:] == plain[2:]
    header, *rows = listed[2].splitlines()
    assert header.split()[0] == "matrix" and len(rows) == len(matrices)
    expected = [
        ["model.layers.0.self_attn.q_proj", "64", "x", "64", "20", "/", "64", "LRC", "62.5%", "0.910"],
        ["model.layers.0.mlp.down_proj", "64", "x", "172", "64", "/", "64", "dense", "100.0%", "-"],
        ["model.layers.1.self_attn.q_proj", "64", "x", "64", "9", "/", "64", "LRC", "28.1%", "0.876"],
    ]
    assert [row.split() for row in rows] == expected

    parser = build_parser()
    assert parser.parse_args(["compress", "c.yaml", "--per-matrix"]).per_matrix
    assert not parser.parse_args(["compress", "c.yaml"]).per_matrix
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "c.yaml", "--per-matrix"])
