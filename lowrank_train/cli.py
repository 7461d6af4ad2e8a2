"""``lowrank-train``: pretrain | compress | finetune | estimate (YAML + ``key=value``) | export | plot.

Examples::

    lowrank-train pretrain recipes/configs/demo.yaml
    lowrank-train pretrain recipes/configs/llama_60m.yaml optimizer.name=galore optimizer.lr=1e-2
    lowrank-train pretrain recipes/configs/llama_60m.yaml --resume
    lowrank-train compress recipes/configs/welore_compress.yaml
    lowrank-train finetune recipes/configs/welore_finetune.yaml
    lowrank-train estimate recipes/configs/llama_7b_qgalore_16gb.yaml
    lowrank-train estimate recipes/configs/llama_1b.yaml --fit 12GiB
    lowrank-train estimate recipes/configs/llama_7b_qapollo_mini.yaml --nproc 8     # one rank's peak under FSDP2
    lowrank-train export runs/demo --step 40
    lowrank-train plot runs/demo

Errors a user can cause (a path, a full or read-only disk, a damaged file, a key) end in one line on stderr that
names the path and what to do, with exit status 2; ``--debug`` (or ``LOWRANK_TRAIN_DEBUG=1``) shows the traceback
instead.

Start-up: this module imports only the standard library. ``--help`` and argument errors return before torch or
transformers is imported (issue 15 item 6, ``benchmarks/cli_startup.py``); each command imports what it uses.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

# Optional GPU kernels that are absent on a CPU machine make torchao / bitsandbytes log at import time; in a
# command-line run that chatter would bury the training output. Library users keep their own logging settings.
for _noisy in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

DEBUG_ENV_VAR = "LOWRANK_TRAIN_DEBUG"
CONFIG_COMMANDS = ("pretrain", "compress", "finetune", "estimate")
COMMANDS = (*CONFIG_COMMANDS, "export", "plot")
HELPS = {
    "pretrain": "train a model (from shapes or a pretrained path) on a corpus",
    "compress": "WeLore-compress a pretrained model; perplexity before and after",
    "finetune": "fine-tune a WeLore-compressed model",
    "estimate": "print the predicted memory of a run, component by component",
    "export": "write a Hugging Face model folder from a run's checkpoint",
    "plot": "write PNGs of loss, learning rate and throughput from a run's metrics.jsonl",
}


def _print(line: str) -> None:
    print(line, flush=True)


def optimizer_epilog() -> str:
    """The registered optimizer methods, one per line (imports the registry, hence torch)."""
    from lowrank_train.optim.registry import describe_optimizers

    return "optimizer.name (lowrank_train.optim registry):\n" + "\n".join(
        f"  {line}" for line in describe_optimizers().splitlines()
    )


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose help lists the optimizer registry, read only when that help is printed."""

    lists_optimizers = False

    def format_help(self) -> str:
        if self.lists_optimizers and self.epilog is None:
            # Read at help time, so a method registered before main() shows up, and plain --help stays light.
            self.epilog = optimizer_epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lowrank-train`` (builds nothing heavy: no torch import)."""
    parser = argparse.ArgumentParser(
        prog="lowrank-train",
        description="Pretrain and fine-tune LLMs in little memory (GaLore, Q-GaLore, layer-wise, WeLore).",
        epilog="`lowrank-train pretrain --help` lists the registered optimizer methods (optimizer.name).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    debug_help = f"show the traceback of an error instead of one line (or set {DEBUG_ENV_VAR}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name in COMMANDS:
        command = sub.add_parser(
            name, help=HELPS[name], description=HELPS[name], formatter_class=argparse.RawDescriptionHelpFormatter
        )
        # SUPPRESS: `lowrank-train --debug export ...` is not undone by the subcommand's default.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        if name == "export":
            command.add_argument("run_dir", help="a run folder (run.output_dir of a pretrain / finetune run)")
            command.add_argument(
                "--step", type=int, default=None, help="the checkpoint's step (default: the newest that verifies)"
            )
            command.add_argument(
                "--out", default=None, help="destination folder (default: RUN_DIR/model, or RUN_DIR/model-step-N)"
            )
            command.add_argument(
                "--overwrite",
                action="store_true",
                help="replace a non-empty --out that is not an earlier export (never the run folder or its contents)",
            )
            continue
        if name == "plot":
            command.add_argument("run_dir", help="a run folder holding metrics.jsonl")
            command.add_argument("--out", default=None, help="destination folder (default: RUN_DIR/plots)")
            continue
        command.lists_optimizers = name != "compress"
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
        if name == "compress":
            command.add_argument(
                "--overwrite", action="store_true", help="replace a non-empty <run.output_dir>/model folder"
            )
            command.add_argument(
                "--per-matrix",
                action="store_true",
                help="the closing report also lists every matrix (rank kept, LRC or dense, energy kept)",
            )
        if name == "estimate":
            command.add_argument(
                "--fit",
                metavar="SIZE",
                default=None,
                help="find the fastest settings that fit SIZE (e.g. 12GiB, 16GB) and write them as a config",
            )
            command.add_argument(
                "--plan-out", default=None, help="where --fit writes its config (default: ./<config stem>.fit.yaml)"
            )
            command.add_argument(
                "--nproc",
                type=_positive_int,
                default=1,
                metavar="N",
                help="each rank's peak under FSDP2 over N processes (weights, gradients, states divided; with --fit "
                "the size is per rank)",
            )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--nproc must be an integer >= 1, got {text!r}")
    return value


def estimate(config: Any, nproc: int = 1) -> str:
    """The memory estimator's breakdown for a run (one rank's under FSDP2 with ``nproc`` > 1), and whether it fits
    this machine's device."""
    from lowrank_train.train.estimate import device_capacity, estimate_device, estimate_run
    from lowrank_train.train.metrics import format_bytes

    result = estimate_run(config, nproc)
    lines = [result.table()]
    if nproc > 1:
        from lowrank_train.memory.estimate import FSDP2_REPLICATED

        lines.append(f"per rank of {nproc} under FSDP2; kept whole on every rank: " + "; ".join(FSDP2_REPLICATED))
    device = estimate_device(config.run.device)
    if device is None:  # e.g. a cuda recipe estimated on a machine without a GPU
        lines.append(f"run.device is {config.run.device}, which this machine lacks: compare the peak with that device")
    else:
        capacity = device_capacity(device)
        verdict = "fits" if result.peak <= capacity else "does NOT fit"
        lines.append(
            f"predicted peak {format_bytes(result.peak)}: {verdict} in the {format_bytes(capacity)} of {device}"
        )
    return "\n".join(lines)


def fit(config: Any, budget: str, source: str, out: str | None, nproc: int = 1) -> str:
    """``estimate --fit``: the plan, both breakdowns side by side, and the YAML written for ``pretrain``."""
    from pathlib import Path

    import yaml

    from lowrank_train.folders import write_text
    from lowrank_train.memory import GIB
    from lowrank_train.memory.plan import parse_bytes
    from lowrank_train.train.estimate import estimate_run, plan_run
    from lowrank_train.train.metrics import format_bytes

    limit = parse_bytes(budget)
    current = estimate_run(config, nproc)
    planned, plan = plan_run(config, limit, nproc)
    path = Path(out) if out is not None else Path(f"{Path(source).stem}.fit.yaml")
    header = (
        f"# Written by `lowrank-train estimate {source} --fit {budget}"
        + (f" --nproc {nproc}" if nproc > 1 else "")
        + "`: the fastest plan predicted to fit\n"
        f"# {format_bytes(limit)}{' per rank' if nproc > 1 else ''} (peak {format_bytes(plan.estimate.peak)}); "
        f"{plan.describe()}.\n"
    )
    write_text(path, header + yaml.safe_dump(planned.to_dict(), sort_keys=False))
    speed = 1 / plan.relative_time
    fidelity = ("same update math", "fewer moment bits (another optimizer method)", "a lower rank")[plan.fidelity]
    unit, size = ("GiB", GIB) if max(current.peak, plan.estimate.peak) >= GIB else ("MiB", 2**20)
    rows = [f"{'component':<26}{'config ' + unit:>12}{'plan ' + unit:>12}"]
    for key, value in plan.estimate.as_dict().items():
        if key == "peak":
            rows.append("-" * 50)
        rows.append(f"{key.replace('_', ' '):<26}{current.as_dict()[key] / size:>12.3f}{value / size:>12.3f}")
    verdict = "fits" if current.peak <= limit else "does NOT fit"
    return "\n".join(
        [
            f"config: predicted peak {format_bytes(current.peak)}, {verdict} in {format_bytes(limit)}",
            f"plan ({fidelity}): {plan.describe()}",
            f"plan: predicted peak {format_bytes(plan.estimate.peak)}, ~{speed:.2f}x the config's speed "
            "(cost model: lowrank_train.memory.plan)",
            *rows,
            f"wrote {path}: lowrank-train pretrain {path}",
        ]
    )


def _run(args: argparse.Namespace) -> None:
    if args.command == "export":
        from lowrank_train.train.export import export_checkpoint

        folder = export_checkpoint(args.run_dir, step=args.step, out=args.out, overwrite=args.overwrite, log=_print)
        _print(f"exported {folder} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
        return
    if args.command == "plot":
        from lowrank_train.train.plot import plot_run

        for path in plot_run(args.run_dir, out=args.out):
            _print(f"wrote {path}")
        return
    from lowrank_train.train.config import load_config

    # Every key and type is checked here, before any model or data is touched.
    config = load_config(args.config, args.overrides)
    if args.command == "estimate":
        if args.fit is None:
            _print(estimate(config, args.nproc))
        else:
            _print(fit(config, args.fit, args.config, args.plan_out, args.nproc))
    elif args.command == "compress":
        from lowrank_train.train.compress_run import compress

        compress(config, log=_print, overwrite=args.overwrite, per_matrix=args.per_matrix)
    else:
        from lowrank_train.train.loop import train

        train(config, mode=args.command, resume=args.resume, log=_print)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrank-train`` console script; returns the exit status."""
    parser = build_parser()
    # parse_known_args lets overrides follow flags (`finetune cfg.yaml --resume run.max_steps=10`).
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and args.command not in CONFIG_COMMANDS):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if args.command in CONFIG_COMMANDS:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0")
    try:
        _run(args)
    except _user_errors() as error:
        if debug:
            raise
        print(f"lowrank-train {args.command}: error: {describe_error(error)}", file=sys.stderr, flush=True)
        return 2
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    # ConfigError, ResumeError, CheckpointError, ExportError are ValueErrors (CheckpointError and FolderExistsError
    # also OSErrors); named here without importing the packages that define them.
    known: tuple[type[BaseException], ...] = (
        OSError,
        ModuleNotFoundError,
        MemoryError,
        FloatingPointError,
        ValueError,
    )
    safetensors = sys.modules.get("safetensors")  # imported only if a command read or wrote a safetensors file
    if safetensors is not None and hasattr(safetensors, "SafetensorError"):
        known += (safetensors.SafetensorError,)
    return known


# What to do about an OSError, by errno; the path comes from the error itself.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free disk space (or choose a folder on another disk) and run the command again",
    errno.EDQUOT: "free space within your disk quota and run the command again",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write, or fix its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file was expected: choose another path",
    errno.EIO: "an I/O error: check the disk, then run the command again",
}


def describe_error(error: BaseException) -> str:
    """One line for an error a user can cause: the library's own message, or for a bare OSError its path and advice.

    Library errors (``ConfigError``, ``CheckpointError``, ...) already name the path and what to do; an OSError
    straight from the operating system (``[Errno 28] No space left on device: 'x'``) is rewritten as
    ``x: No space left on device; free disk space ...``.
    """
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
        advice = _OS_ERROR_ADVICE.get(error.errno or 0)
        where = " -> ".join(paths) or "(no path given)"
        line = f"{where}: {error.strerror}"
        return f"{line}; {advice}" if advice else line
    if type(error).__name__ == "SafetensorError":
        return f"a safetensors file cannot be read or written ({error}); the file is damaged or the disk is full"
    return str(error) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
