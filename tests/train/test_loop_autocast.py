"""The training loop under ``run.autocast=bfloat16`` (issue 13 item 2): the fp32 run is the reference."""

from pathlib import Path

import pytest

from lowrank_train.train import ConfigError, load_config, read_metrics, train

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes/configs/demo.yaml"


def _run(overrides, output_dir, *extra):
    config = load_config(DEMO, [*overrides, f"run.output_dir={output_dir}", "run.eval_every=0", *extra])
    summary = train(config, log=lambda line: None)
    losses = [r["loss"] for r in read_metrics(output_dir) if r["split"] == "train"]
    return summary, losses


@pytest.mark.parametrize("optimizer", ["galore", "qgalore"])
def test_autocast_run_tracks_the_fp32_run(tiny, tmp_path, optimizer):
    """bf16 autocast (INT8 weights for qgalore) trains like the fp32 run: every step's loss within a bf16
    tolerance, and the final held-out loss too; the losses are not identical, so autocast was really on."""
    common = [f"optimizer.name={optimizer}", "run.save_final=false"]
    fp32, fp32_losses = _run(tiny, tmp_path / "fp32", *common)
    mixed, mixed_losses = _run(tiny, tmp_path / "bf16", *common, "run.autocast=bfloat16")
    assert mixed["autocast"] == "bfloat16" and fp32["autocast"] is None
    assert len(mixed_losses) == len(fp32_losses) == 4
    assert mixed_losses != fp32_losses
    # bf16 rounds each matmul input to 2^-9 relative; over 4 steps of this width-32 model the losses moved by
    # at most 4e-5 relative (measured), so 1e-3 leaves room while a real dtype bug (loss off by >1%) fails.
    for got, expected in zip(mixed_losses, fp32_losses, strict=True):
        assert got == pytest.approx(expected, rel=1e-3)
    assert mixed["final_eval_loss"] == pytest.approx(fp32["final_eval_loss"], rel=1e-3)


def test_autocast_rejects_other_dtypes(tiny):
    with pytest.raises(ConfigError, match="run.autocast must be one of bfloat16"):
        load_config(DEMO, [*tiny, "run.autocast=float16"])
