"""WeLore at LLaMA-7B layer shapes on the CPU: peak RSS and seconds per block of ``compress_model`` (issue 14 item 2).

Model: ``LlamaForCausalLM`` with the 7B layer shapes (hidden 4096, intermediate 11008, 32 heads, no GQA), 1 or 2
layers, vocabulary 1024, random weights (``materialize_llama``, bf16: the peak of building it is the model plus one
fp32 linear). Calibration: 8 random sequences of 128 token ids. ``compress_model`` at a 20% parameter target with
``"whitened"`` and with the default strategy (``WeLoreConfig``'s), ``min_ratio`` 0.5, 2 threads, factors staged
on disk (the default for a CPU model).

Each case runs in a fresh subprocess. Peak RSS is the kernel's high-water mark (``VmHWM``), reset
(``/proc/self/clear_refs``) right before ``compress_model``, so it is the peak of the compression alone;
"before" is the resident set just before (Python, torch, the model, the calibration ids). Seconds per block
come from ``compress_model``'s log: pass 1 (the block's calibration forward and statistics, whitening, spectra)
and pass 2 (the same statistics and whitening, the factors of the block's Low-Rank Components and their
calibration energy for the report); "other" is the rest (the chain check, the output-sensitivity backward passes
of loss-based strategies, the allocation, the swap).

Run: ``.venv/bin/python benchmarks/welore_7b_shapes.py`` (writes ``benchmarks/results/welore_7b_shapes.md`` and
the raw numbers next to it as ``.json``).
On this project's shared 2-core CPU one block takes tens of minutes: the 4096-sized eigendecompositions dominate.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import markdown_table, set_threads  # noqa: E402

GIB = 2**30
HIDDEN, INTERMEDIATE, HEADS = 4096, 11008, 32


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def block_working_set(hidden: int, intermediate: int) -> dict[str, int]:
    """Bytes one LLaMA block needs beyond its weights: float64 input statistics of its 4 distinct linear inputs
    (q/k/v share one, gate/up share one), their float32 whitening factors, and its bf16 weights for scale."""
    inputs = [hidden, hidden, hidden, intermediate]
    return {
        "statistics": sum(8 * n * n + 8 * n for n in inputs),
        "whitening": sum(4 * n * n for n in inputs),
        "weights_bf16": 2 * (4 * hidden * hidden + 3 * hidden * intermediate),
    }


class _BlockTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message, values = str(record.msg), tuple(record.args or ())
        if message.startswith("spectra of") and len(values) == 2:
            self.records.append(("spectra", str(values[0]), float(values[1])))
        elif message.startswith("factors of") and len(values) == 3:
            self.records.append(("factors", str(values[0]), float(values[1])))
            self.records.append(("energy", str(values[0]), float(values[2])))


def run_case(strategy: str, layers: int, args: argparse.Namespace) -> dict:
    """One compression in this process; returns what the table shows."""
    set_threads(args.threads)
    import torch
    from transformers import LlamaConfig

    import lowrank_train
    from lowrank_train.nn.meta_init import materialize_llama
    from lowrank_train.welore import WeLoreConfig, compress_model

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    model = materialize_llama(config, dtype=torch.bfloat16, seed=0).eval()
    calibration = torch.randint(
        0, args.vocab, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    model_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    welore = WeLoreConfig(
        target=args.target, strategy=strategy, num_threads=args.threads, staging_dir=args.staging_dir
    )

    times = _BlockTimes()
    logger = logging.getLogger("lowrank_train.welore.compress")
    logger.addHandler(times)
    logger.setLevel(logging.INFO)
    gc.collect()
    _reset_peak()
    before = _status_bytes("VmRSS")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    report = compress_model(model, welore, calibration)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    peak = _status_bytes("VmHWM")
    after = _status_bytes("VmRSS")
    model_bytes_after = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    per_block: dict[str, dict[str, float]] = {}
    for phase, name, block_seconds in times.records:
        per_block.setdefault(name, {})[phase] = block_seconds
    return {
        "strategy": strategy,
        "layers": layers,
        "package": os.path.dirname(lowrank_train.__file__),
        "model_bytes": model_bytes,
        "model_bytes_after": model_bytes_after,
        "rss_before": before,
        "rss_peak": peak,
        "rss_after": after,
        "seconds": seconds,
        "per_block": per_block,
        "num_lrc": report.num_lrc,
        "num_matrices": len(report.matrices),
        "param_reduction": report.param_reduction,
        "ranks": {m.name.split("layers.")[-1]: m.rank for m in report.matrices if m.lrc},
        "threads": args.threads,
        "load_average": [load_before, load_after],
    }


def _row(result: dict) -> list[object]:
    blocks = result["per_block"].values()
    spectra = sum(b.get("spectra", 0.0) for b in blocks)
    factors = sum(b.get("factors", 0.0) for b in blocks)
    energy = sum(b.get("energy", 0.0) for b in blocks)
    layers = result["layers"]
    other = result["seconds"] - spectra - factors
    extra = result["rss_peak"] - result["rss_before"]
    return [
        result["strategy"],
        layers,
        f"{result['model_bytes'] / GIB:.2f}",
        f"{result['rss_before'] / GIB:.2f}",
        f"{result['rss_peak'] / GIB:.2f}",
        f"{extra / GIB:.2f}",
        f"{result['rss_after'] / GIB:.2f}",
        f"{spectra / layers:.0f}",
        f"{factors / layers:.0f} ({energy / layers:.0f})",
        f"{other:.0f}",
        f"{result['seconds']:.0f}",
        f"{result['seconds'] / layers:.0f}",
        f"{result['num_lrc']}/{result['num_matrices']}",
        f"{result['param_reduction']:.3f}",
        " / ".join(f"{x:.1f}" for x in result["load_average"]),
    ]


HEADER = [
    "strategy",
    "layers",
    "model GiB",
    "RSS before GiB",
    "peak RSS GiB",
    "peak - before GiB",
    "RSS after GiB",
    "pass 1 s/block",
    "pass 2 s/block (energy)",
    "other s",
    "total s",
    "total s/block",
    "LRC",
    "param reduction",
    "load avg (start / end)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--strategies", nargs="+", default=None, help="default: whitened and the default strategy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="smaller shapes for a quick trial run")
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--staging-dir", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "welore_7b_shapes.md"))
    parser.add_argument("--case", nargs=2, metavar=("STRATEGY", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case is not None:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args)), flush=True)
        return

    from lowrank_train.welore import WeLoreConfig

    default = WeLoreConfig.__dataclass_fields__["strategy"].default
    strategies = args.strategies or list(dict.fromkeys(["whitened", default]))
    passthrough = [
        f"--threads={args.threads}",
        f"--vocab={args.vocab}",
        f"--hidden={args.hidden}",
        f"--intermediate={args.intermediate}",
        f"--heads={args.heads}",
        f"--sequences={args.sequences}",
        f"--seq-len={args.seq_len}",
        f"--target={args.target}",
    ]
    if args.staging_dir is not None:
        passthrough.append(f"--staging-dir={args.staging_dir}")
    results = []
    for strategy in strategies:
        for layers in args.layers:
            command = [sys.executable, __file__, *passthrough, "--case", strategy, str(layers)]
            print(f"running {strategy} with {layers} layer(s) ...", flush=True)
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"case {strategy}/{layers} failed with exit code {done.returncode}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(markdown_table(HEADER, [_row(result)]), flush=True)

    work = block_working_set(args.hidden, args.intermediate)
    table = markdown_table(HEADER, [_row(r) for r in results])
    block_rows = [
        [
            r["strategy"],
            r["layers"],
            name,
            f"{t.get('spectra', 0):.0f}",
            f"{t.get('factors', 0):.0f}",
            f"{t.get('energy', 0):.0f}",
        ]
        for r in results
        for name, t in r["per_block"].items()
    ]
    block_table = markdown_table(
        ["strategy", "layers", "block", "pass 1 s", "pass 2 s", "of which energy s"], block_rows
    )
    lines = [
        "# WeLore at LLaMA-7B layer shapes (CPU)",
        "",
        f"`python benchmarks/welore_7b_shapes.py` (package: `{results[0]['package']}`): hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.heads} heads, vocabulary {args.vocab}, bf16 random weights; "
        f"calibration {args.sequences} x {args.seq_len} tokens; target {args.target}, min_ratio 0.5, "
        f"{args.threads} threads, factors staged on disk; each case in a fresh process, peak = VmHWM reset right "
        "before `compress_model`.",
        "",
        table,
        "",
        f"One block at these shapes: weights {work['weights_bf16'] / GIB:.2f} GiB (bf16); float64 input statistics "
        f"of its 4 distinct inputs {work['statistics'] / GIB:.2f} GiB; their float32 whitening factors "
        f"{work['whitening'] / GIB:.2f} GiB. The whole-model implementation held every block's statistics and "
        f"whitening factors at once ({(work['statistics'] + work['whitening']) / GIB:.2f} GiB per block, "
        f"{32 * (work['statistics'] + work['whitening']) / GIB:.0f} GiB for LLaMA-7B's 32 blocks) plus every "
        "replacement layer before swapping any in.",
        "",
        "Seconds per block, as `compress_model` logged them (pass 2 includes the report's calibration energy, "
        "float64 products with the input second moment):",
        "",
        block_table,
        "",
        "Ranks of the Low-Rank Components: "
        + "; ".join(f"{r['strategy']}/{r['layers']}: {json.dumps(r['ranks'])}" for r in results),
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
