"""``make demo`` / ``python -m lowrank_train.demo``: the same as ``lowrank-train pretrain recipes/configs/demo.yaml``.

A small LLaMA pretrained with Q-GaLore (INT8 weights, INT4 bases, 8-bit states) on the King James Bible with
GPT-2's tokenizer, on the CPU, offline, in a few minutes; it ends with the optimizer-memory table next to AdamW.
Extra ``key=value`` arguments override the config (``python -m lowrank_train.demo run.max_steps=10``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lowrank_train.cli import main

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "recipes" / "configs" / "demo.yaml"


def run(argv: list[str] | None = None) -> int:
    """Run the demo recipe with optional overrides; returns the exit status."""
    if not DEMO_CONFIG.is_file():
        print(f"demo config {DEMO_CONFIG} not found: run from a checkout of the repository", file=sys.stderr)
        return 2
    overrides = list(sys.argv[1:] if argv is None else argv)
    # A rerun starts afresh: the demo is a showcase, not a long run to resume.
    return main(["pretrain", str(DEMO_CONFIG), "run.overwrite=true", *overrides])


if __name__ == "__main__":
    sys.exit(run())
