"""``benchmarks/gpu_check.py --smoke`` runs every section of the GPU command on the CPU, so it cannot rot while no
GPU is around (issue 13 item 4)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = (
    "environment",
    "cuda_tests",
    "llama7b_qgalore",
    "llama7b_qapollo_mini",
    "llama7b_qgalore4bit",
    "llama7b_adamw8bit",
    "quality",
)
SEVEN_B = ("llama7b_qgalore", "llama7b_qapollo_mini", "llama7b_qgalore4bit", "llama7b_adamw8bit")


def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "LOWRANK_TRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    markdown = (out / "gpu_check.md").read_text()
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    for name in SECTIONS:
        assert f"## {name}" in markdown, name
        assert sections[name]["status"] == "ok", (name, sections[name].get("error"))
    tests = sections["cuda_tests"]["result"]
    assert "-m cuda" in tests["command"] and tests["counts"], tests  # on a CPU the CUDA cases are skipped
    for name in SEVEN_B:
        run = sections[name]["result"]
        assert run["tokens_per_s"] > 0 and run["estimate_peak_bytes"] > 0, name
        assert len(run["losses"]) == run["steps"] >= 2 and all(math.isfinite(v) for v in run["losses"]), name
        assert ("refresh_all_s" in run) == (name != "llama7b_adamw8bit"), name  # only GaLore builds bases
        assert run["block_matrices"] == (14 if name != "llama7b_adamw8bit" else 0)  # 7 per layer, 2 layers
    rows = sections["quality"]["result"]["rows"]
    assert [row["method"] for row in rows] == ["AdamW (per-group lr)", "GaLore", "Q-GaLore (INT8 weights)"]
    assert all(math.isfinite(row["eval_loss"]) and row["vs_adamw"] > 0 for row in rows)
    assert "tokens/s vs AdamW8bit baseline" in markdown
    assert sections["llama7b_qapollo_mini"]["result"]["recipe"] == "llama_7b_qapollo_mini.yaml"
