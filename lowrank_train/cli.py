"""``lowrank-train``: pretrain | compress | finetune | estimate, each from a YAML config plus ``key=value`` overrides.

Examples::

    lowrank-train pretrain recipes/configs/demo.yaml
    lowrank-train pretrain recipes/configs/llama_60m.yaml optimizer.name=galore optimizer.lr=1e-2
    lowrank-train pretrain recipes/configs/llama_60m.yaml --resume
    lowrank-train compress recipes/configs/welore_compress.yaml
    lowrank-train finetune recipes/configs/welore_finetune.yaml
    lowrank-train estimate recipes/configs/llama_7b_qgalore_16gb.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

# Optional GPU kernels that are absent on a CPU machine make torchao / bitsandbytes log at import time; in a
# command-line run that chatter would bury the training output. Library users keep their own logging settings.
for _noisy in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

from lowrank_train.optim.registry import describe_optimizers  # noqa: E402
from lowrank_train.train.config import ConfigError, TrainConfig, load_config  # noqa: E402

COMMANDS = ("pretrain", "compress", "finetune", "estimate")


def _print(line: str) -> None:
    print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lowrank-train``."""
    # The optimizer list comes from the registry, so a method registered before main() shows up here too.
    methods = "optimizer.name (lowrank_train.optim registry):\n" + "\n".join(
        f"  {line}" for line in describe_optimizers().splitlines()
    )
    parser = argparse.ArgumentParser(
        prog="lowrank-train",
        description="Pretrain and fine-tune LLMs in little memory (GaLore, Q-GaLore, layer-wise, WeLore).",
        epilog=methods,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "pretrain": "train a model (from shapes or a pretrained path) on a corpus",
        "compress": "WeLore-compress a pretrained model; perplexity before and after",
        "finetune": "fine-tune a WeLore-compressed model",
        "estimate": "print the predicted memory of a run, component by component",
    }
    for name in COMMANDS:
        command = sub.add_parser(
            name,
            help=helps[name],
            description=helps[name],
            epilog=methods if name != "compress" else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_argument("config", help="YAML config, e.g. recipes/configs/demo.yaml")
        command.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. optimizer.lr=3e-3 run.max_steps=10",
        )
        if name in ("pretrain", "finetune"):
            command.add_argument(
                "--resume", action="store_true", help="continue from the newest checkpoint in run.output_dir"
            )
    return parser


def estimate(config: TrainConfig) -> str:
    """The memory estimator's breakdown for a run, and whether it fits this machine's device."""
    from lowrank_train.train.estimate import device_capacity, estimate_run
    from lowrank_train.train.metrics import format_bytes
    from lowrank_train.train.setup import resolve_device

    result = estimate_run(config)
    lines = [result.table()]
    try:
        device = resolve_device(config.run.device)
    except ConfigError:
        device = None  # e.g. a cuda recipe estimated on a machine without a GPU
    if device is None:
        lines.append(f"run.device is {config.run.device}, which this machine lacks: compare the peak with that device")
    else:
        capacity = device_capacity(device)
        verdict = "fits" if result.peak <= capacity else "does NOT fit"
        lines.append(
            f"predicted peak {format_bytes(result.peak)}: {verdict} in the {format_bytes(capacity)} of {device}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrank-train`` console script; returns the exit status."""
    parser = build_parser()
    # parse_known_args lets overrides follow flags (`finetune cfg.yaml --resume run.max_steps=10`).
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # bitsandbytes warns at import about an optional 4-bit CPU kernel that nothing here uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        # Every key and type is checked here, before any model or data is touched.
        config = load_config(args.config, args.overrides)
        if args.command == "estimate":
            _print(estimate(config))
            return 0
        from lowrank_train.train.compress import compress
        from lowrank_train.train.loop import train

        if args.command == "compress":
            compress(config, log=_print)
        else:
            train(config, mode=args.command, resume=args.resume, log=_print)
    except (ConfigError, FileNotFoundError, ModuleNotFoundError, MemoryError, FloatingPointError, ValueError) as error:
        print(f"lowrank-train {args.command}: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
