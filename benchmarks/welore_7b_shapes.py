"""WeLore at 7B-class layer shapes on the CPU: peak RSS and seconds per block of ``compress_model`` (issues 14, 24).

Families (``--family``):

* ``llama`` (default): ``LlamaForCausalLM`` with the 7B layer shapes (hidden 4096, intermediate 11008, 32 heads,
  no GQA), random weights (``materialize_llama``, bf16: the peak of building it is the model plus one fp32 linear).
  Calibration: 8 random sequences of 128 token ids.
* ``gemma2``: ``Gemma2ForCausalLM`` built from its ``transformers`` config at gemma-2-9b widths (hidden 3584,
  intermediate 14336, 16 heads, 8 key/value heads of 256), layers alternating sliding-window and full attention
  (``layer_types``), the window (32) shorter than the calibration sequences, so each block needs its own mask:
  blocks with per-layer attention types compressed one at a time (issue 24). Calibration: 2 x 64 tokens, the
  fewest above ``compress_model``'s 64-token floor that still reach past the window; the case fails if
  ``compress_model`` falls back on a whole-model pass.

1 or 2 layers, vocabulary 1024. ``compress_model`` at a 20% parameter target with ``"whitened"`` and with the
default strategy (``WeLoreConfig``'s; ``--strategies`` chooses), ``min_ratio`` 0.5, 2 threads, factors staged on
disk (the default for a CPU model).

Each case runs in a fresh subprocess. Peak RSS is the kernel's high-water mark (``VmHWM``), reset
(``/proc/self/clear_refs``) right before ``compress_model``, so it is the peak of the compression alone;
"before" is the resident set just before (Python, torch, the model, the calibration ids). Seconds per block
come from ``compress_model``'s log: pass 1 (the block's calibration forward and statistics, whitening, spectra)
and pass 2 (the same statistics and whitening, the factors of the block's Low-Rank Components and their
calibration energy for the report); "other" is the rest (the chain check, the output-sensitivity backward passes
of loss-based strategies, the allocation, the swap).

Run: ``.venv/bin/python benchmarks/welore_7b_shapes.py [--family gemma2 --strategies whitened]`` (writes
``benchmarks/results/welore_7b_shapes.md`` and the raw numbers next to it as ``.json``; a run replaces the cases it
measured and keeps the other families' and strategies' results).
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
# hidden, intermediate, attention heads, key/value heads, head size, calibration sequences x length
FAMILIES = {
    "llama": {
        "hidden": 4096,
        "intermediate": 11008,
        "heads": 32,
        "kv_heads": 32,
        "head_dim": 128,
        "sequences": 8,
        "seq_len": 128,
        "title": "LLaMA-7B layer shapes",
    },
    "gemma2": {
        "hidden": 3584,
        "intermediate": 14336,
        "heads": 16,
        "kv_heads": 8,
        "head_dim": 256,
        "sequences": 2,
        "seq_len": 64,
        "sliding_window": 32,
        "title": "Gemma2 (gemma-2-9b widths), sliding and full attention",
    },
}
SHAPE_KEYS = ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "sequences", "seq_len", "sliding_window")
WHOLE_MODEL_WARNING = ".*cannot be calibrated one at a time.*"


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


def block_working_set(shapes: dict) -> dict[str, int]:
    """Bytes one block needs beyond its weights: float64 input statistics of its 4 distinct linear inputs
    (q/k/v share one, gate/up share one), their float32 whitening factors, and its bf16 weights for scale."""
    hidden, intermediate = shapes["hidden"], shapes["intermediate"]
    attention = shapes["heads"] * shapes["head_dim"]
    inputs = [hidden, hidden, attention, intermediate]
    kv = shapes["kv_heads"] * shapes["head_dim"]
    return {
        "statistics": sum(8 * n * n + 8 * n for n in inputs),
        "whitening": sum(4 * n * n for n in inputs),
        "weights_bf16": 2 * (2 * hidden * attention + 2 * hidden * kv + 3 * hidden * intermediate),
    }


def build_model(family: str, layers: int, args: argparse.Namespace):  # noqa: ANN201 (torch imported lazily)
    """The family's model at the shapes of ``args``, bf16 random weights, in eval mode."""
    import torch

    if family == "llama":
        from transformers import LlamaConfig

        from lowrank_train.nn.meta_init import materialize_llama

        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim,
            max_position_embeddings=args.seq_len,
            tie_word_embeddings=False,
        )
        return materialize_llama(config, dtype=torch.bfloat16, seed=0).eval()
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.seq_len,
        sliding_window=args.sliding_window,
        attn_implementation="eager",  # what transformers recommends for Gemma2 (attention logit soft-capping)
    )
    if args.sliding_window >= args.seq_len:
        raise SystemExit(f"gemma2: the window {args.sliding_window} must be shorter than --seq-len {args.seq_len}")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly, not via an fp32 copy of the model
    try:
        return Gemma2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


class _BlockTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
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
    import warnings

    import torch

    import lowrank_train
    from lowrank_train.welore import WeLoreConfig, compress_model

    model = build_model(args.family, layers, args)
    layer_types = list(getattr(model.config, "layer_types", None) or [])
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
    logger.setLevel(logging.DEBUG)  # the per-block seconds are debug lines
    gc.collect()
    _reset_peak()
    before = _status_bytes("VmRSS")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=WHOLE_MODEL_WARNING)  # block by block, or the case fails
        report = compress_model(model, welore, calibration)
    seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    peak = _status_bytes("VmHWM")
    after = _status_bytes("VmRSS")
    model_bytes_after = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    per_block: dict[str, dict[str, float]] = {}
    for phase, name, block_seconds in times.records:
        per_block.setdefault(name, {})[phase] = block_seconds
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "commit": commit,  # the tree measured, if uncommitted edits are absent
        "family": args.family,
        "shapes": {key: getattr(args, key) for key in SHAPE_KEYS},
        "layer_types": layer_types,
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
        "target": args.target,
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


def _shapes_of(result: dict) -> dict:
    # Results measured before issue 24 were LLaMA's and carry no shapes: its defaults then.
    defaults = {key: value for key, value in FAMILIES["llama"].items() if key in SHAPE_KEYS}
    return {**defaults, "sliding_window": None, **result.get("shapes", {})}


def _family_section(family: str, results: list[dict]) -> list[str]:
    shapes = _shapes_of(results[0])
    target, threads = results[0].get("target", 0.2), results[0]["threads"]
    work = block_working_set(shapes)
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
    attention = ""
    if shapes.get("sliding_window"):
        types = next((r["layer_types"] for r in results if r["layers"] == max(x["layers"] for x in results)), [])
        attention = (
            f", layer types {' / '.join(types)} (sliding window {shapes['sliding_window']}), each block "
            "calibrated with its own mask"
        )
    sources = sorted({f"commit {r['commit']}" if r.get("commit") else r["package"] for r in results})
    lines = [
        f"## {FAMILIES.get(family, {}).get('title', family)}",
        "",
        f"`python benchmarks/welore_7b_shapes.py --family {family}` (run from `{', '.join(sources)}`): hidden "
        f"{shapes['hidden']}, intermediate {shapes['intermediate']}, {shapes['heads']} heads, {shapes['kv_heads']} "
        f"key/value heads of {shapes['head_dim']}{attention}, vocabulary 1024, bf16 random weights; calibration "
        f"{shapes['sequences']} x {shapes['seq_len']} tokens; target {target}, min_ratio 0.5, {threads} threads, "
        "factors staged on disk; each case in a fresh process, peak = VmHWM reset right before `compress_model`.",
        "",
        table,
        "",
    ]
    by_strategy: dict[str, dict[int, dict]] = {}
    for r in results:
        by_strategy.setdefault(r["strategy"], {})[r["layers"]] = r
    for strategy, cases in by_strategy.items():
        if 1 in cases and 2 in cases:
            peak = (cases[2]["rss_peak"] - cases[1]["rss_peak"]) / GIB
            block = (cases[2]["model_bytes"] - cases[1]["model_bytes"]) / GIB
            work_gib = (work["statistics"] + work["whitening"]) / GIB
            lines += [
                f"Peak in depth ({strategy}): peak(2 blocks) - peak(1 block) = {peak:.2f} GiB, {peak / block:.1f}x "
                f"one block's weights ({block:.2f} GiB); the second block's statistics and whitening factors held "
                f"next to the first's would add {work_gib:.2f} GiB more.",
                "",
            ]
    lines += [
        f"One block at these shapes: weights {work['weights_bf16'] / GIB:.2f} GiB (bf16); float64 input statistics "
        f"of its 4 distinct inputs {work['statistics'] / GIB:.2f} GiB; their float32 whitening factors "
        f"{work['whitening'] / GIB:.2f} GiB. A whole-model pass holds every block's statistics and whitening "
        f"factors at once ({(work['statistics'] + work['whitening']) / GIB:.2f} GiB per block) plus every "
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
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--strategies", nargs="+", default=None, help="default: whitened and the default strategy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    for key in SHAPE_KEYS:  # the family's by default; smaller shapes for a quick trial run
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--staging-dir", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "welore_7b_shapes.md"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the report from the .json, run nothing")
    parser.add_argument("--case", nargs=2, metavar=("STRATEGY", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key in SHAPE_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, FAMILIES[args.family].get(key))

    if args.case is not None:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args)), flush=True)
        return

    from lowrank_train.welore import WeLoreConfig

    default = WeLoreConfig.__dataclass_fields__["strategy"].default
    strategies = args.strategies or list(dict.fromkeys(["whitened", default]))
    passthrough = [
        f"--family={args.family}",
        f"--threads={args.threads}",
        f"--vocab={args.vocab}",
        f"--target={args.target}",
    ]
    passthrough += [
        f"--{key.replace('_', '-')}={getattr(args, key)}" for key in SHAPE_KEYS if getattr(args, key) is not None
    ]
    if args.staging_dir is not None:
        passthrough.append(f"--staging-dir={args.staging_dir}")
    raw = Path(args.out).with_suffix(".json")
    previous = json.loads(raw.read_text()) if raw.is_file() else []
    results = []
    for strategy in strategies if not args.render_only else []:
        for layers in args.layers:
            command = [sys.executable, __file__, *passthrough, "--case", strategy, str(layers)]
            print(f"running {args.family} {strategy} with {layers} layer(s) ...", flush=True)
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"case {args.family}/{strategy}/{layers} failed with exit code {done.returncode}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(markdown_table(HEADER, [_row(result)]), flush=True)

    measured = {(r["family"], r["strategy"], r["layers"]) for r in results}
    kept = [r for r in previous if (r.get("family", "llama"), r["strategy"], r["layers"]) not in measured]
    everything = kept + results
    families = list(dict.fromkeys(r.get("family", "llama") for r in everything))
    lines = ["# WeLore at 7B-class layer shapes (CPU)", ""]
    for family in sorted(families, key=list(FAMILIES).index):
        lines += _family_section(family, [r for r in everything if r.get("family", "llama") == family])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    raw.write_text(json.dumps(everything, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
