"""Quality at equal token budget: AdamW (one lr, and per-group lrs), 8-bit AdamW, GaLore, Q-GaLore, APOLLO,
APOLLO-Mini and Fira on real text.

Pretrains a small LLaMA from scratch on the offline English corpus (King James Bible, ``load_corpus("kjv")``,
GPT-2 tokenizer ``load_tokenizer("gpt2-offline")``) with every optimizer at each learning rate of a sweep, the same
data order and token budget for all; then reruns each method's best learning rate with more seeds (each seed
changes the initial weights and the data order, the same for every method). Reports the sweep, each method's
best eval loss per seed and their mean, the gap to the best AdamW baseline, optimizer-state bytes (measured live
tensors) and step time, and writes PNG plots.

The baselines matter. GaLore's param groups train the embeddings / norms / head at ``lr`` and the projected block
weights at an effective ``scale x lr``; an AdamW with one learning rate for every parameter must compromise
between the two and loses for that reason alone. So the AdamW baselines come in two forms: one learning rate
(``adamw``, ``adamw8bit``) and the same two-group split as GaLore (``adamw_grouped``, ``adamw8bit_grouped``:
block linear weights at ``block_ratio x lr``, ``block_ratio`` = GaLore's ``scale`` by default), both swept over the
same grid. GaLore is compared with the best of all of them.

The model is far smaller than GaLore's LLaMA-20M/60M to fit a shared 2-core CPU (hidden 128, 6 layers, 200 steps of
16 x 64 tokens, ~1 CPU hour for the default run on a busy machine). So that the block linear layers (the part GaLore
projects) hold most of the parameters, as they do at the papers' scale, the embedding is tied to the head and the
GPT-2 vocabulary is compacted to the 4,095 ids most frequent in the corpus plus one shared id for the rarer ones
(~2.5% of the tokens; ``--max-vocab 0`` keeps all ids, a lossless re-indexing); the share is reported. GaLore-style
groups: the block linear layers are projected (rank a quarter of the width, like GaLore's 60M setting).

``--long`` reruns the best rows (``--long-methods``) at a longer horizon (default 1000 steps, ~1M tokens a run),
each at its best lr of the short sweep in ``quality.json``, every seed: one JSON per run in ``quality_long/``
(claimed by an exclusive file, so several workers can share the folder and a rerun resumes), the report in
``quality_long.md`` / ``quality_long_loss.png`` (``--long --report-only`` rebuilds them, naming missing runs).

Usage::

    python benchmarks/quality.py                                   # full run, writes benchmarks/results/quality*
    python benchmarks/quality.py --steps 5 --lrs 3e-3 --seeds 0 --extras --output /tmp/q   # smoke run
    python benchmarks/quality.py --long                  # one worker of the long runs (start two to share them)
    python benchmarks/quality.py --long --report-only    # quality_long.md / .png from the runs so far
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    block_linear_share,
    compact_kjv_blocks,
    heldout_loss,
    per_group_lr_groups,
    set_threads,
    small_llama,
    warmup_cosine,
)

RESULTS = Path(__file__).parent / "results"
BASELINES = ("adamw", "adamw_grouped", "adamw_grouped_rms", "adamw8bit", "adamw8bit_grouped")
METHODS = (
    *BASELINES, "galore", "qgalore", "qgalore_layerwise", "qgalore_4bit_moments", "apollo", "apollo_mini", "fira",
)  # fmt: skip
LABELS = {
    "adamw": "AdamW, one lr",
    "adamw_grouped": "AdamW, per-group lr",
    "adamw_grouped_rms": "AdamW, per-group lr, GaLore-RMS-matched",
    "adamw8bit": "8-bit AdamW, one lr",
    "adamw8bit_grouped": "8-bit AdamW, per-group lr",
    "galore": "GaLore (AdamW)",
    "qgalore": "Q-GaLore",
    "qgalore_layerwise": "Q-GaLore layer-wise",
    "qgalore_4bit_moments": "Q-GaLore, 4-bit moments (torchao)",
    "apollo": "APOLLO (channel-wise)",
    "apollo_mini": "APOLLO-Mini (rank 1, tensor-wise)",
    "fira": "Fira",
}
SWEPT = ("adamw", "adamw_grouped", "adamw_grouped_rms", "galore", "qgalore", "apollo", "apollo_mini", "fira")
TARGETS = {"galore": 0.02, "qgalore": 0.03}  # the papers' claims: within 2% / 3% of AdamW's loss
# Methods that may run unswept, at the best lr of the method they are a variant of.
ANCHORS = {
    "adamw8bit": "adamw",
    "adamw8bit_grouped": "adamw_grouped",
    "qgalore_layerwise": "qgalore",
    "qgalore_4bit_moments": "qgalore",
}


def _model(vocab: int, args: argparse.Namespace, quantized: bool, seed: int) -> torch.nn.Module:
    return small_llama(
        vocab,
        args.hidden,
        args.intermediate,
        args.layers,
        args.heads,
        args.seq,
        seed=seed,
        tied=not args.untied,
        quantized=quantized,
    )


# Settings that change a run's result: a --resume reuses saved runs only when all of them match.
RUN_SETTINGS = (
    "steps", "warmup", "batch", "seq", "hidden", "intermediate", "layers", "heads", "untied", "max_vocab", "rank",
    "update_gap", "scale", "block_ratio", "eval_blocks", "threads",
)  # fmt: skip


def galore_rms_ratio(weight: torch.Tensor, rank: int, scale: float) -> float:
    """GaLore's block step relative to ``lr``, in RMS per element: ``scale * sqrt(r / min(m, n))``.

    GaLore applies ``scale * P @ N`` with ``P`` (min(m, n) x r) orthonormal and ``N`` the inner Adam's normalized
    r-row update; ``||P @ N||_F = ||N||_F`` spread over ``min(m, n) / r`` times more entries.
    """
    side = min(weight.shape)
    return scale * math.sqrt(min(rank, side) / side)


def make_optimizer(model, method: str, lr: float, args: argparse.Namespace):
    import bitsandbytes as bnb

    from lowrank_train import lowrank_param_groups
    from lowrank_train.optim import (
        APOLLOAdamW,
        APOLLOMini,
        FiraAdamW,
        GaLoreAdamW,
        QGaLoreAdamW4bit,
        QGaLoreAdamW8bit,
    )
    from lowrank_train.optim.layerwise import LayerwiseOptimizer

    ratio = args.scale if args.block_ratio is None else args.block_ratio
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if method == "adamw_grouped":
        return torch.optim.AdamW(per_group_lr_groups(model, lr, ratio), lr=lr, weight_decay=0.0)
    rank = args.rank or args.hidden // 4
    if method == "adamw_grouped_rms":
        groups = per_group_lr_groups(model, lr, lambda w: galore_rms_ratio(w, rank, args.scale))
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    if method == "adamw8bit":
        return bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)
    if method == "adamw8bit_grouped":
        return bnb.optim.AdamW8bit(per_group_lr_groups(model, lr, ratio), lr=lr, weight_decay=0.0)
    groups = lowrank_param_groups(model, rank=rank, update_gap=args.update_gap, scale=args.scale)
    if method == "galore":
        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    if method == "qgalore":
        return QGaLoreAdamW8bit(groups, lr=lr, weight_decay=0.0)
    if method == "qgalore_4bit_moments":
        return QGaLoreAdamW4bit(groups, lr=lr, weight_decay=0.0)
    # The presets write their own options over the GaLore groups: APOLLO alpha 1 and a random projection at the
    # GaLore rank; APOLLO-Mini rank 1, tensor-wise, alpha sqrt(128); Fira GaLore's SVD basis and alpha.
    if method == "apollo":
        return APOLLOAdamW(groups, lr=lr, weight_decay=0.0)
    if method == "apollo_mini":
        return APOLLOMini(groups, lr=lr, weight_decay=0.0)
    if method == "fira":
        return FiraAdamW(groups, lr=lr, weight_decay=0.0)
    return LayerwiseOptimizer(groups, lambda g: QGaLoreAdamW8bit(g, lr=lr, weight_decay=0.0))


def run(method: str, lr: float, seed: int, train: torch.Tensor, heldout: torch.Tensor, vocab: int, args) -> dict:
    from lowrank_train.memory import measure_live_bytes

    began = time.perf_counter()
    model = _model(vocab, args, quantized=method.startswith("qgalore"), seed=seed)
    optimizer = make_optimizer(model, method, lr, args)
    layerwise = method.endswith("layerwise")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.steps, args.warmup))
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(1 + seed))
    losses, times = [], []
    for step in range(args.steps):
        index = order[(torch.arange(args.batch) + step * args.batch) % train.shape[0]]
        ids = train[index]
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if not layerwise:  # the layer-wise engine stepped inside backward
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    live = measure_live_bytes(model, optimizer)
    eval_loss = heldout_loss(model, heldout[: args.eval_blocks], args.batch) if math.isfinite(losses[-1]) else math.nan
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "train_losses": losses,
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss) if math.isfinite(eval_loss) else math.nan,
        "step_s": sorted(times)[len(times) // 2],
        "run_s": time.perf_counter() - began,
        "live": live,
    }


def plot(best: dict[str, dict], output: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, result in best.items():
        losses = torch.tensor(result["train_losses"])
        window = 20
        smooth = losses.unfold(0, window, 1).mean(1) if losses.numel() > window else losses
        ax.plot(
            range(window - 1, window - 1 + smooth.numel()), smooth, label=f"{LABELS[method]} (lr {result['lr']:g})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (moving average of {window}), seed 0")
    ax.set_title("Small LLaMA on KJV, equal token budget, best lr of each method")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = output / "quality_loss.png"
    fig.savefig(path, dpi=120)
    written.append(path.name)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [LABELS[m].replace(", ", ",\n") for m in best]
    bottom = torch.zeros(len(best))
    for key, color in (("weights", "#4c72b0"), ("optimizer_states", "#dd8452"), ("projection_bases", "#55a868")):
        values = torch.tensor([best[m]["live"][key] / 2**20 for m in best])
        ax.bar(names, values, bottom=bottom, label=key.replace("_", " "), color=color)
        bottom += values
    ax.set_ylabel("MiB (measured live tensors)")
    ax.set_title("Memory after training: weights, optimizer states, bases")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    fig.tight_layout()
    path = output / "quality_memory.png"
    fig.savefig(path, dpi=120)
    written.append(path.name)
    plt.close(fig)
    return written


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(
    results: list[dict],
    args: argparse.Namespace,
    vocab: int,
    heldout_blocks: int,
    elapsed: float,
    rare_share: float,
    reused: int = 0,
) -> str:
    """The markdown report: best lr per method with every seed, the gap to the best AdamW baseline, the sweep."""
    sweep_seed = args.seeds[0]
    swept = list(args.methods)
    best_lr = {}
    for method in swept:
        candidates = [
            r for r in results if r["method"] == method and r["seed"] == sweep_seed and math.isfinite(r["eval_loss"])
        ]
        if candidates:
            best_lr[method] = min(candidates, key=lambda r: r["eval_loss"])["lr"]
    for method in args.extras:
        if ANCHORS[method] in best_lr:
            best_lr[method] = best_lr[ANCHORS[method]]
    rows = {}  # method -> the runs at its best lr, by seed
    for method, lr in best_lr.items():
        rows[method] = sorted(
            (r for r in results if r["method"] == method and r["lr"] == lr and math.isfinite(r["eval_loss"])),
            key=lambda r: r["seed"],
        )
    means = {m: _mean([r["eval_loss"] for r in runs]) for m, runs in rows.items() if runs}
    most_seeds = max((len(runs) for runs in rows.values()), default=0)
    baselines = [m for m in BASELINES if m in means and len(rows[m]) == most_seeds]
    reference = min(baselines, key=lambda m: means[m]) if baselines else None
    ref_by_seed = {r["seed"]: r["eval_loss"] for r in rows.get(reference, [])}

    def gap(method: str) -> float:
        """Mean eval loss over the method's seeds / the reference's mean over the same seeds, minus 1."""
        runs = [r for r in rows[method] if r["seed"] in ref_by_seed]
        return _mean([r["eval_loss"] for r in runs]) / _mean([ref_by_seed[r["seed"]] for r in runs]) - 1

    model = _model(vocab, args, quantized=False, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    share = block_linear_share(model)
    tokens = args.steps * args.batch * args.seq
    ratio = args.scale if args.block_ratio is None else args.block_ratio
    rank = args.rank or args.hidden // 4
    lrs = " ".join(f"{x:g}" for x in args.lrs)
    lines = [
        "# Quality at equal token budget (small LLaMA, KJV, CPU)",
        "",
        f"Command: `python benchmarks/quality.py --steps {args.steps} --hidden {args.hidden} --intermediate "
        f"{args.intermediate} --layers {args.layers} --heads {args.heads} --methods {' '.join(swept)} --lrs {lrs} "
        "--seeds "
        f"{' '.join(map(str, args.seeds))}{' --full-sweep' if args.full_sweep else ''}` ({args.threads} thread, "
        "shared 2-core machine). "
        f"Total wall time {elapsed / 60:.1f} min"
        + (
            f" ({reused} of the {len(results)} runs saved by an earlier invocation, reused with `--resume`)."
            if reused
            else "."
        ),
        "",
        f"Model: LLaMA, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate}, "
        + (
            f"vocabulary compacted to the {vocab - 1} most frequent GPT-2 ids of the corpus plus one shared id for "
            f"the rarer ones ({rare_share * 100:.1f}% of the held-out tokens), embedding "
            if args.max_vocab
            else f"vocabulary compacted to the {vocab} GPT-2 ids present in the corpus, embedding "
        )
        + f"{'untied from' if args.untied else 'tied to'} the head: {n_params / 1e6:.2f}M parameters, "
        f"**{share * 100:.1f}% of them in the block linear layers** (the part GaLore projects). "
        f"Data: KJV, sequence {args.seq}, batch {args.batch}, {args.steps} steps = {tokens / 1e3:.0f}k tokens a run; "
        f"eval on {heldout_blocks} held-out blocks from the end of the text. Schedule: {args.warmup} warmup steps, "
        f"cosine to 10%. Weight decay 0. GaLore / Q-GaLore: rank {rank}, update gap {args.update_gap}, scale "
        f"{args.scale}; Q-GaLore adds INT8 block weights (stochastic rounding), INT4 basis, 8-bit projected moments, "
        f"adaptive refresh. APOLLO: rank {rank}, random projection, channel-wise scales, alpha 1; APOLLO-Mini: "
        "rank 1, tensor-wise scale, alpha sqrt(128); Fira: GaLore's SVD basis, rank and alpha plus the residual "
        "scaled per channel; all three with the norm-growth limiter (gamma 1.01), the library's presets "
        "(`APOLLOAdamW`, `APOLLOMini`, `FiraAdamW`) on GaLore's param groups. "
        f"Per-group AdamW: block linear weights at {ratio:g} x lr, embeddings / norms / head at lr "
        "(the split GaLore's groups imply).",
        "",
        f"Protocol: lr grid {lrs}, "
        + (
            "every point for every swept method"
            if args.full_sweep
            else f"{' '.join(f'{x:g}' for x in args.start_lrs)} first, extended one grid point at a time on the side "
            "of the best while the best is at the edge of what was tried"
        )
        + f", seed {sweep_seed}; the best lr of each method is rerun with seed(s) "
        f"{', '.join(map(str, args.seeds[1:])) or '(none)'} (a seed sets the initial weights and the data order, the "
        "same for every method, so seeds are paired across methods). "
        + "".join(f"{LABELS[m]}: at the best lr of {LABELS[ANCHORS[m]]}, seed {sweep_seed}. " for m in args.extras)
        + (
            f"Reference: the best AdamW baseline run with every seed, by mean eval loss, **{LABELS[reference]}**; "
            "the gaps are paired "
            "(each method's mean over its seeds against the reference's mean over the same seeds)."
            if reference
            else ""
        ),
        "",
        "## Best learning rate per method",
        "",
        "| method | best lr | eval loss, mean | per seed | vs best AdamW (mean) | per seed | perplexity | weights "
        "| optimizer states | bases | step time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in rows.items():
        if not runs:
            continue
        mean = means[method]
        per_seed = " / ".join(f"{r['eval_loss']:.4f}" for r in runs)
        rel = f"{gap(method) * 100:+.2f}%" if reference else "n/a"
        rel_seed = " / ".join(
            f"{(r['eval_loss'] / ref_by_seed[r['seed']] - 1) * 100:+.2f}%" if r["seed"] in ref_by_seed else "n/a"
            for r in runs
        )
        edge = " (grid edge)" if method in swept and best_lr[method] in (min(args.lrs), max(args.lrs)) else ""
        live = runs[0]["live"]
        lines.append(
            f"| {LABELS[method]} | {best_lr[method]:g}{edge} | {mean:.4f} | {per_seed} | {rel} | {rel_seed} | "
            f"{math.exp(mean):.1f} | {live['weights'] / 2**20:.2f} MiB | {live['optimizer_states'] / 2**20:.2f} MiB "
            f"| {live['projection_bases'] / 2**20:.3f} MiB | {runs[0]['step_s'] * 1e3:.0f} ms |"
        )
    if reference:
        lines += ["", "## Targets (the papers' claims)", ""]
        for method, tolerance in TARGETS.items():
            if method not in means:
                continue
            verdict = "met" if gap(method) <= tolerance else "**not met**"
            worst = max(r["eval_loss"] / ref_by_seed[r["seed"]] - 1 for r in rows[method] if r["seed"] in ref_by_seed)
            lines.append(
                f"- {LABELS[method]} within {tolerance * 100:.0f}% of {LABELS[reference]}: {gap(method) * 100:+.2f}% "
                f"(mean of {len(rows[method])} seed(s); worst seed {worst * 100:+.2f}%) -> {verdict}."
            )
    lines += ["", f"## Sweep (eval loss, seed {sweep_seed})", ""]
    lines += ["| method | " + " | ".join(f"lr {x:g}" for x in args.lrs) + " |", "|---|" + "---|" * len(args.lrs)]
    for method in swept:
        cells = []
        for lr in args.lrs:
            r = next((x for x in results if x["method"] == method and x["lr"] == lr and x["seed"] == sweep_seed), None)
            if r is None:
                cells.append("-")  # not tried: the sweep stopped before this point
            else:
                cells.append(f"{r['eval_loss']:.4f}" if math.isfinite(r["eval_loss"]) else "diverged")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    args.output.mkdir(parents=True, exist_ok=True)
    best_seed0 = {m: runs[0] for m, runs in rows.items() if runs}
    if best_seed0:
        written = plot(best_seed0, args.output)
        lines += ["", "Plots: " + ", ".join(f"`benchmarks/results/{name}`" for name in written)]
    lines += [
        "",
        "Optimizer-state bytes are measured live tensors (the optimizer's state_dict walked, shared storages counted "
        "once). The embedding / head is full-rank in every method, so the low-rank saving on the block weights shows "
        "less here than at 7B. Step times are medians on a 2-core machine shared with other jobs whose load changed "
        "between runs (and between invocations, for runs reused with `--resume`): they vary 2-4x between runs of the "
        "same method, so they do not rank the methods; use `benchmarks/optimizer_step.py` for speed.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(SWEPT),
        choices=METHODS,
        help="methods swept over --lrs",
    )
    parser.add_argument(
        "--extras",
        nargs="*",
        default=["adamw8bit_grouped", "qgalore_4bit_moments"],
        choices=sorted(ANCHORS),
        help="variants run unswept at the best lr of their anchor method, first seed only: "
        + ", ".join(f"{k} at {v}'s" for k, v in ANCHORS.items()),
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], help="the grid")
    parser.add_argument(
        "--start-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="grid points tried first"
    )
    parser.add_argument("--full-sweep", action="store_true", help="try every grid point for every method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="first: the sweep; rest: best lrs")
    parser.add_argument("--steps", type=int, default=None, help="default 200, 1000 with --long")
    parser.add_argument("--warmup", type=int, default=None, help="default a tenth of --steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=352)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--untied", action="store_true", help="a separate head instead of the tied embedding")
    parser.add_argument(
        "--max-vocab", type=int, default=4096, help="keep the most frequent ids, rarer ones share one (0: keep all)"
    )
    parser.add_argument("--rank", type=int, default=None, help="GaLore rank (default: hidden / 4)")
    parser.add_argument("--update-gap", type=int, default=50)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--block-ratio", type=float, default=None, help="per-group AdamW block lr ratio (= scale)")
    parser.add_argument("--eval-blocks", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="rewrite quality.md from --output's quality.json")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the runs saved in --output's quality.json (same run settings)"
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help="long-horizon mode: --long-methods x --seeds at each method's best lr of the short sweep in "
        "--sweep-file, one JSON per run in --long-output (workers in parallel share it; a rerun resumes)",
    )
    parser.add_argument("--long-methods", nargs="+", default=list(LONG_METHODS), choices=METHODS)
    parser.add_argument("--long-output", type=Path, default=None, help="default: --output's quality_long/")
    parser.add_argument("--sweep-file", type=Path, default=None, help="default: --output's quality.json")
    args = parser.parse_args()
    args.max_vocab = args.max_vocab or None
    args.steps = args.steps or (1000 if args.long else 200)
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    if args.long:
        args.long_output = args.long_output or args.output / "quality_long"
        args.sweep_file = args.sweep_file or args.output / "quality.json"
        long_main(args, parser)
        return
    for method in args.extras:
        if ANCHORS[method] not in args.methods:
            parser.error(f"--extras {method} runs at {ANCHORS[method]}'s best lr: add {ANCHORS[method]} to --methods")
        if method in args.methods:
            parser.error(f"{method} is in both --methods and --extras")
    if args.report_only:
        saved = json.loads((args.output / "quality.json").read_text())
        for key, value in saved["args"].items():
            if key not in ("output", "report_only", "resume"):
                setattr(args, key, value)
        heldout_blocks = min(args.eval_blocks, compact_kjv_blocks(args.seq, args.max_vocab)[1].shape[0])
        text = report(
            saved["results"],
            args,
            saved["vocab"],
            heldout_blocks,
            saved["elapsed_s"],
            saved["rare_share"],
            saved.get("reused_runs", 0),
        )
        (args.output / "quality.md").write_text(text + ("\n(partial run)\n" if saved["partial"] else ""))
        print(text)
        return
    set_threads(args.threads)
    began = time.perf_counter()

    train, heldout, vocab = compact_kjv_blocks(args.seq, args.max_vocab)
    rare_share = float((heldout == vocab - 1).float().mean()) if args.max_vocab else 0.0
    saved = {}  # (method, lr, seed) -> a run of an earlier invocation with the same run settings
    if args.resume and (args.output / "quality.json").exists():
        previous = json.loads((args.output / "quality.json").read_text())
        differ = [k for k in RUN_SETTINGS if previous["args"].get(k) != getattr(args, k)]
        if differ:
            parser.error(f"--resume: {args.output / 'quality.json'} was run with other {', '.join(differ)}")
        for r in previous["results"] + previous.get("unused", []):
            saved[(r["method"], r["lr"], r["seed"])] = {**r, "reused": True}
    results = []

    def record(method: str, lr: float, seed: int) -> dict:
        result = saved.pop((method, lr, seed), None) or run(method, lr, seed, train, heldout, vocab, args)
        results.append(result)
        # Saved after every run, so a killed run keeps what it did (--report-only rewrites the report from it).
        dump(results, list(saved.values()), args, vocab, rare_share, time.perf_counter() - began, partial=True)
        print(
            f"{method:<20} lr {lr:<7g} seed {seed} eval {result['eval_loss']:.4f}{' (saved)' * ('reused' in result)} "
            f"step {result['step_s'] * 1e3:.0f} ms run {result['run_s']:.0f} s "
            f"(total {(time.perf_counter() - began) / 60:.1f} min)",
            flush=True,
        )
        return result

    sweep_seed, *more_seeds = args.seeds
    best = {}
    for method in args.methods:
        lr = sweep(method, lambda lr, m=method: record(m, lr, sweep_seed)["eval_loss"], args)
        if lr is not None:
            best[method] = lr
    for method in args.extras:
        if ANCHORS[method] in best:
            best[method] = best[ANCHORS[method]]
            record(method, best[method], sweep_seed)
    for seed in more_seeds:
        for method, lr in best.items():
            if method in args.methods:  # extras are side rows: one seed keeps the CPU budget
                record(method, lr, seed)
    # Runs reused with --resume count at the time they took then.
    elapsed = time.perf_counter() - began + sum(r["run_s"] for r in results if "reused" in r)
    reused = sum("reused" in r for r in results)
    dump(results, list(saved.values()), args, vocab, rare_share, elapsed, partial=False, reused=reused)
    text = report(results, args, vocab, min(args.eval_blocks, heldout.shape[0]), elapsed, rare_share, reused)
    (args.output / "quality.md").write_text(text)
    print(text)


def sweep(method: str, evaluate, args: argparse.Namespace) -> float | None:
    """Best lr of ``method`` on the sorted grid ``args.lrs``: the ``args.start_lrs`` points first, then one more grid
    point at a time on the side of the best while the best sits at the edge of what was tried (so every method gets
    an interior optimum, or the grid's edge, on the same grid). ``--full-sweep`` tries every point."""
    grid = sorted(args.lrs)
    start = [lr for lr in grid if lr in args.start_lrs]
    if args.full_sweep or not start:
        tried = {lr: evaluate(lr) for lr in grid}
    else:
        tried = {lr: evaluate(lr) for lr in start}
        while True:
            finite = {lr: loss for lr, loss in tried.items() if math.isfinite(loss)}
            low, high = min(tried), max(tried)
            best = min(finite, key=finite.get) if finite else low  # all diverged: go lower
            if best == low and grid.index(low) > 0:
                nxt = grid[grid.index(low) - 1]
            elif best == high and finite and grid.index(high) < len(grid) - 1:
                nxt = grid[grid.index(high) + 1]
            else:
                break
            tried[nxt] = evaluate(nxt)
    finite = {lr: loss for lr, loss in tried.items() if math.isfinite(loss)}
    return min(finite, key=finite.get) if finite else None


def dump(
    results: list[dict],
    unused: list[dict],
    args,
    vocab: int,
    rare_share: float,
    elapsed: float,
    partial: bool,
    reused: int = 0,
) -> None:
    """``results``: the runs of this protocol; ``unused``: saved runs it did not ask for (kept for a later resume)."""
    args.output.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"args": settings, "vocab": vocab, "rare_share": rare_share, "elapsed_s": elapsed, "partial": partial}
    payload["reused_runs"] = reused
    payload.update(results=[{k: v for k, v in r.items() if k != "reused"} for r in results], unused=unused)
    _write_atomic(args.output / "quality.json", json.dumps(payload))


LONG_METHODS = ("adamw_grouped", "galore", "qgalore", "apollo", "apollo_mini", "fira")
LONG_REFERENCE = "adamw_grouped"
HORIZON_SETTINGS = ("steps", "warmup")  # what --long changes; every other run setting must match the sweep's


class _Pending(Exception):
    """A point the adaptive sweep would try next has not been run (yet)."""


def sweep_best_lrs(saved: dict, methods) -> dict[str, float | None]:
    """Each method's best lr, replaying :func:`sweep` over the first-seed runs of a saved ``quality.json``.

    A method whose sweep is unfinished (the replay asks for a point not saved) is left out; one whose every point
    diverged maps to None.
    """
    swept = argparse.Namespace(**saved["args"])
    seed = swept.seeds[0]
    losses = {
        (r["method"], r["lr"]): r["eval_loss"] for r in saved["results"] + saved.get("unused", []) if r["seed"] == seed
    }
    best = {}
    for method in methods:

        def lookup(lr: float, m: str = method) -> float:
            if (m, lr) not in losses:
                raise _Pending
            return losses[(m, lr)]

        try:
            best[method] = sweep(method, lookup, swept)
        except _Pending:
            pass
    return best


def paired_gaps(runs: dict[int, float], reference: dict[int, float]) -> tuple[dict[int, float], float | None]:
    """Relative eval-loss gaps to ``reference`` on the seeds both have (seed -> loss maps, finite losses only).

    Returns:
        ``{seed: runs[seed] / reference[seed] - 1}`` and the mean over those seeds divided by the reference's mean
        over the same seeds, minus 1 (None when no seed is shared).
    """
    seeds = sorted(s for s in runs if s in reference and math.isfinite(runs[s]) and math.isfinite(reference[s]))
    per_seed = {s: runs[s] / reference[s] - 1 for s in seeds}
    if not seeds:
        return per_seed, None
    return per_seed, _mean([runs[s] for s in seeds]) / _mean([reference[s] for s in seeds]) - 1


def _run_path(folder: Path, method: str, seed: int) -> Path:
    return folder / f"{method}_seed{seed}.json"


def _claim_path(folder: Path, method: str, seed: int) -> Path:
    return folder / f".{method}_seed{seed}.claim"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(folder: Path, method: str, seed: int) -> bool:
    """Takes a run for this process (an exclusively created claim file with its pid); a dead worker's claim is
    taken over."""
    path = _claim_path(folder, method, seed)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
            except (OSError, ValueError):
                return False
            if not pid or _alive(pid):  # no pid yet: its owner is between creating and writing it
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def _claimed_by_live(folder: Path, method: str, seed: int) -> bool:
    path = _claim_path(folder, method, seed)
    try:
        pid = int(path.read_text() or 0)
    except (OSError, ValueError):
        return False
    return bool(pid) and _alive(pid)


def _load_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict | None:
    """The short sweep's quality.json (None while it is unreadable), checked to share every run setting but the
    horizon."""
    try:
        saved = json.loads(args.sweep_file.read_text())
    except FileNotFoundError:
        parser.error(f"--sweep-file {args.sweep_file} does not exist: run the short sweep first")
    except json.JSONDecodeError:
        return None
    differ = [k for k in RUN_SETTINGS if k not in HORIZON_SETTINGS and saved["args"].get(k) != getattr(args, k)]
    if differ:
        parser.error(f"--sweep-file {args.sweep_file} was run with other {', '.join(differ)}")
    return saved


def long_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A worker of the long-horizon runs, or (``--report-only``) the report of what exists."""
    folder = args.long_output
    folder.mkdir(parents=True, exist_ok=True)
    if LONG_REFERENCE not in args.long_methods:
        parser.error(f"--long-methods must include {LONG_REFERENCE}, the reference of the paired gaps")
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    for path in sorted(folder.glob("*_seed*.json")):
        theirs = json.loads(path.read_text())["settings"]
        differ = [k for k in RUN_SETTINGS if theirs.get(k) != settings[k]]
        if differ:
            parser.error(f"{path} was run with other {', '.join(differ)}: use another --long-output")
    if args.report_only:
        text = long_report(args, parser)
        print(text)
        return
    set_threads(args.threads)
    train, heldout, vocab = compact_kjv_blocks(args.seq, args.max_vocab)
    rare_share = float((heldout == vocab - 1).float().mean()) if args.max_vocab else 0.0
    plan = [(m, s) for s in args.seeds for m in args.long_methods]  # every method's first seed before the next
    began = time.perf_counter()
    waiting_for = []
    while True:
        todo = [(m, s) for m, s in plan if not _run_path(folder, m, s).exists()]
        saved = _load_sweep(args, parser)
        best = sweep_best_lrs(saved, args.long_methods) if saved else {}
        ready = [(m, s) for m, s in todo if best.get(m) is not None]
        picked = next(((m, s) for m, s in ready if _claim(folder, m, s)), None)
        if picked is None:
            pending = sorted({m for m, s in todo if m not in best and not _claimed_by_live(folder, m, s)})
            if not pending:
                break  # the rest are taken by other workers, or their sweep diverged everywhere
            if pending != waiting_for:
                print(f"waiting for the short sweep of {', '.join(pending)}", flush=True)
                waiting_for = pending
            time.sleep(60)
            continue
        method, seed = picked
        try:
            result = run(method, best[method], seed, train, heldout, vocab, args)
            payload = {
                "settings": settings,
                "vocab": vocab,
                "rare_share": rare_share,
                "heldout_blocks": min(args.eval_blocks, heldout.shape[0]),
                "lr_from": str(args.sweep_file),
                "result": result,
            }
            _write_atomic(_run_path(folder, method, seed), json.dumps(payload))
        finally:
            _claim_path(folder, method, seed).unlink(missing_ok=True)
        print(
            f"{method:<20} lr {best[method]:<7g} seed {seed} eval {result['eval_loss']:.4f} "
            f"step {result['step_s'] * 1e3:.0f} ms run {result['run_s']:.0f} s "
            f"(worker total {(time.perf_counter() - began) / 60:.1f} min)",
            flush=True,
        )
        long_report(args, parser)
    long_report(args, parser)


def long_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """quality_long.md and quality_long_loss.png in ``--output`` from the run files in ``--long-output``."""
    folder = args.long_output
    runs = {}  # (method, seed) -> payload
    for path in sorted(folder.glob("*_seed*.json")):
        payload = json.loads(path.read_text())
        runs[(payload["result"]["method"], payload["result"]["seed"])] = payload
    saved = _load_sweep(args, parser)
    best = sweep_best_lrs(saved, args.long_methods) if saved else {}
    loss = {
        m: {s: runs[(m, s)]["result"]["eval_loss"] for s in args.seeds if (m, s) in runs} for m in args.long_methods
    }

    # The short horizon's paired gaps, from the sweep file's runs at the same lrs.
    short = {}
    if saved:
        for m in args.long_methods:
            short[m] = {
                r["seed"]: r["eval_loss"]
                for r in saved["results"] + saved.get("unused", [])
                if r["method"] == m and r["lr"] == best.get(m) and r["seed"] in args.seeds
            }

    tokens = args.steps * args.batch * args.seq
    rank = args.rank or args.hidden // 4
    seeds = " ".join(map(str, args.seeds))
    first = next(iter(runs.values()), None)
    lines = [
        "# Quality at a longer horizon (small LLaMA, KJV, CPU)",
        "",
        f"Command (each worker; two ran in parallel): `python benchmarks/quality.py --long --steps {args.steps} "
        f"--warmup {args.warmup} --hidden {args.hidden} --intermediate {args.intermediate} --layers {args.layers} "
        f"--heads {args.heads} --seeds {seeds}` ({args.threads} thread each, shared 2-core machine); this report: "
        "the same with `--report-only`.",
        "",
        f"The model, data, eval and method settings of `quality.md`, at {args.steps} steps of {args.batch} x "
        f"{args.seq} tokens = {tokens / 1e6:.2f}M tokens a run ({args.steps / 200:g}x "
        f"the short sweep's 200 steps), {args.warmup} warmup steps, cosine to 10%"
        + (f", eval on {first['heldout_blocks']} held-out blocks" if first else "")
        + ". Each method runs at **its best lr of the short (200-step) sweep** in "
        f"`{Path(str(args.sweep_file)).name}` (not re-swept at this horizon, so a method whose optimum moves with "
        f"the horizon is at a disadvantage); seeds {seeds}, paired across methods (a seed sets the initial weights "
        f"and the data order). GaLore / Q-GaLore / Fira rank {rank}, APOLLO rank {rank} (channel-wise, alpha 1), "
        f"APOLLO-Mini rank 1 (tensor-wise, alpha sqrt(128)); update gap {args.update_gap}. Reference: "
        f"**{LABELS[LONG_REFERENCE]}**; gaps are eval loss / the reference's at the same seed, minus 1.",
        "",
        "| method | lr | "
        + " | ".join(f"eval, seed {s}" for s in args.seeds)
        + " | eval, mean | "
        + " | ".join(f"vs {LABELS[LONG_REFERENCE]}, seed {s}" for s in args.seeds)
        + " | vs ref., mean (paired) | same at 200 steps, mean (paired) | step time | run time |",
        "|---|---|" + "---|" * (2 * len(args.seeds) + 5),
    ]
    gaps = {}
    for m in args.long_methods:
        per_seed, mean_gap = paired_gaps(loss[m], loss[LONG_REFERENCE])
        gaps[m] = (per_seed, mean_gap)
        short_gap = paired_gaps(short.get(m, {}), short.get(LONG_REFERENCE, {}))[1] if short else None
        cells = [f"{loss[m][s]:.4f}" if s in loss[m] else "missing" for s in args.seeds]
        finite = [v for v in loss[m].values() if math.isfinite(v)]
        mean = f"{_mean(finite):.4f}" if len(finite) == len(args.seeds) else "n/a"
        gap_cells = [f"{per_seed[s] * 100:+.2f}%" if s in per_seed else "n/a" for s in args.seeds]
        mine = [runs[(m, s)]["result"] for s in args.seeds if (m, s) in runs]
        step = f"{_mean([r['step_s'] for r in mine]) * 1e3:.0f} ms" if mine else "-"
        wall = f"{_mean([r['run_s'] for r in mine]) / 60:.1f} min" if mine else "-"
        lr = f"{best[m]:g}" if best.get(m) is not None else ("diverged" if m in best else "sweep unfinished")
        lines.append(
            f"| {LABELS[m]} | {lr} | "
            + " | ".join(cells)
            + f" | {mean} | "
            + " | ".join(gap_cells)
            + f" | {'n/a' if mean_gap is None else f'{mean_gap * 100:+.2f}%'} | "
            + f"{'n/a' if short_gap is None else f'{short_gap * 100:+.2f}%'} | {step} | {wall} |"
        )
    missing = [f"{m} seed {s}" + (" (running)" if _claimed_by_live(folder, m, s) else "")
               for s in args.seeds for m in args.long_methods if (m, s) not in runs]  # fmt: skip
    lines += ["", "Missing runs: " + (", ".join(missing) if missing else "none") + "."]

    per_seed, mean_gap = gaps.get("galore", ({}, None))
    short_galore = paired_gaps(short.get("galore", {}), short.get(LONG_REFERENCE, {}))[1] if short else None
    lines += ["", '## Does "GaLore beats AdamW (per-group lr) by ~8%" hold at this horizon?', ""]
    if len(per_seed) < len(args.seeds):
        lines.append(f"Not decided: {len(per_seed)} of {len(args.seeds)} paired seeds have both runs.")
    else:
        every = all(g < 0 for g in per_seed.values())
        band = all(-0.10 <= g <= -0.06 for g in per_seed.values())
        lines.append(
            f"Paired gap of GaLore to {LABELS[LONG_REFERENCE]} at {args.steps} steps: "
            + " / ".join(f"{g * 100:+.2f}% (seed {s})" for s, g in per_seed.items())
            + f", mean {mean_gap * 100:+.2f}%"
            + (f"; at 200 steps {short_galore * 100:+.2f}%" if short_galore is not None else "")
            + f'. GaLore lower at every seed: {"yes" if every else "no"}. Reading "~8%" as a gap between -6% and '
            f"-10% at every seed: **{'holds' if band else 'does not hold'}**. Two seeds at one model size and one "
            "lr per method: this says nothing beyond this setting."
        )
    args.output.mkdir(parents=True, exist_ok=True)
    if runs:
        lines += [
            "",
            "Plot: `benchmarks/results/quality_long_loss.png` (train loss, moving average of 50 steps; right: the "
            "second half). Step and run times are medians / means on a 2-core machine shared with other jobs whose "
            "load changed during the runs: they do not rank the methods.",
        ]
        _plot_long(runs, args)
    text = "\n".join(lines) + "\n"
    _write_atomic(args.output / "quality_long.md", text)
    return text


def _plot_long(runs: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    window = 50
    tail = args.steps // 2  # the right panel: the second half, where the gaps are a few hundredths
    for i, m in enumerate(args.long_methods):
        for j, s in enumerate(args.seeds):
            if (m, s) not in runs:
                continue
            result = runs[(m, s)]["result"]
            losses = torch.tensor(result["train_losses"])
            smooth = losses.unfold(0, window, 1).mean(1) if losses.numel() > window else losses
            steps = torch.arange(window - 1, window - 1 + smooth.numel())
            style = {"color": colors[i % len(colors)], "linestyle": "-" if j == 0 else "--"}
            style["linewidth"] = 1.2 if j == 0 else 0.8
            ax.plot(steps, smooth, label=f"{LABELS[m]} (lr {result['lr']:g}, seed {s})", **style)
            keep = steps >= tail
            zoom.plot(steps[keep], smooth[keep], **style)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (moving average of {window})")
    ax.set_title(f"Small LLaMA on KJV, {args.steps} steps, each method at its short-sweep best lr", fontsize=10)
    ax.set_ylim(top=min(7.0, ax.get_ylim()[1]))
    ax.legend(fontsize=7, ncol=2)
    zoom.set_xlabel("step")
    zoom.set_title(f"steps {tail}-{args.steps}", fontsize=10)
    fig.tight_layout()
    tmp = args.output / f".quality_long_loss.{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, args.output / "quality_long_loss.png")
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    """Writes via a temporary file and a rename, so a reader in another process never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
