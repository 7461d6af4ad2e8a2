"""Quality at equal token budget: AdamW, 8-bit Adam, GaLore, Q-GaLore and layer-wise Q-GaLore on real text.

Pretrains a small LLaMA from scratch on the offline English corpus (King James Bible, ``load_corpus("kjv")``,
GPT-2 tokenizer ``load_tokenizer("gpt2-offline")``) with every optimizer at each learning rate of a small sweep,
the same data order and token budget for all; reports the sweep, each method's best eval loss / perplexity,
optimizer-state bytes (measured live tensors) and step time, and writes PNG plots.

The model is much smaller than GaLore's LLaMA-20M/60M to keep the whole benchmark within ~25 CPU minutes on a shared
2-core machine: hidden 128, 4 layers, 4 heads, MLP 352, sequence 64. To keep the output layer from dominating, the
GPT-2 vocabulary is compacted to the token ids that occur in the corpus (a bijective re-indexing, no token is lost).
GaLore-style groups: the block linear layers are projected (rank 32, a quarter of the width, like GaLore's 60M
setting), embeddings / norms / head train at the full learning rate with the base optimizer.

Usage::

    python benchmarks/quality.py                      # full sweep, writes benchmarks/results/quality.md + PNGs
    python benchmarks/quality.py --steps 20 --lrs 3e-3 --methods adamw galore   # smoke run
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
from common import compact_kjv_blocks, heldout_loss, small_llama, warmup_cosine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ("adamw", "adamw8bit", "galore", "qgalore", "qgalore_layerwise", "qgalore_4bit_moments")
LABELS = {
    "adamw": "AdamW",
    "adamw8bit": "8-bit AdamW",
    "galore": "GaLore (AdamW)",
    "qgalore": "Q-GaLore",
    "qgalore_layerwise": "Q-GaLore layer-wise",
    "qgalore_4bit_moments": "Q-GaLore, 4-bit moments (torchao)",
}


def _model(vocab: int, args: argparse.Namespace, quantized: bool) -> torch.nn.Module:
    return small_llama(
        vocab, args.hidden, args.intermediate, args.layers, args.heads, args.seq, seed=0, quantized=quantized
    )


def make_optimizer(model, method: str, lr: float, args: argparse.Namespace):
    import bitsandbytes as bnb

    from lowrank_train import lowrank_param_groups
    from lowrank_train.optim import GaLoreAdamW, QGaLoreAdamW4bit, QGaLoreAdamW8bit
    from lowrank_train.optim.layerwise import LayerwiseOptimizer

    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if method == "adamw8bit":
        return bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)
    groups = lowrank_param_groups(model, rank=args.rank, update_gap=args.update_gap, scale=args.scale)
    if method == "galore":
        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    if method == "qgalore":
        return QGaLoreAdamW8bit(groups, lr=lr, weight_decay=0.0)
    if method == "qgalore_4bit_moments":
        return QGaLoreAdamW4bit(groups, lr=lr, weight_decay=0.0)
    return LayerwiseOptimizer(groups, lambda g: QGaLoreAdamW8bit(g, lr=lr, weight_decay=0.0))


def run(method: str, lr: float, train: torch.Tensor, heldout: torch.Tensor, vocab: int, args) -> dict:
    from lowrank_train.memory import measure_live_bytes

    model = _model(vocab, args, quantized=method.startswith("qgalore"))
    optimizer = make_optimizer(model, method, lr, args)
    layerwise = method.endswith("layerwise")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.steps, args.warmup))
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(1))
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
        "train_losses": losses,
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss) if math.isfinite(eval_loss) else math.nan,
        "step_s": sorted(times)[len(times) // 2],
        "live": live,
    }


def plot(best: dict[str, dict], output: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, result in best.items():
        losses = torch.tensor(result["train_losses"])
        window = 10
        smooth = losses.unfold(0, window, 1).mean(1) if losses.numel() > window else losses
        ax.plot(
            range(window - 1, window - 1 + smooth.numel()), smooth, label=f"{LABELS[method]} (lr {result['lr']:g})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (moving average of 10)")
    ax.set_title("Small LLaMA on KJV, equal token budget")
    ax.legend()
    fig.tight_layout()
    path = output / "quality_loss.png"
    fig.savefig(path, dpi=120)
    written.append(path.name)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [LABELS[m] for m in best]
    bottom = torch.zeros(len(best))
    for key, color in (("weights", "#4c72b0"), ("optimizer_states", "#dd8452"), ("projection_bases", "#55a868")):
        values = torch.tensor([best[m]["live"][key] / 2**20 for m in best])
        ax.bar(names, values, bottom=bottom, label=key.replace("_", " "), color=color)
        bottom += values
    ax.set_ylabel("MiB (measured live tensors)")
    ax.set_title("Memory after training: weights, optimizer states, bases")
    ax.tick_params(axis="x", labelrotation=15)
    ax.legend()
    fig.tight_layout()
    path = output / "quality_memory.png"
    fig.savefig(path, dpi=120)
    written.append(path.name)
    plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=352)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--update-gap", type=int, default=50)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    train, heldout, vocab = compact_kjv_blocks(args.seq)
    results = []
    for method in args.methods:
        for lr in args.lrs:
            result = run(method, lr, train, heldout, vocab, args)
            results.append(result)
            print(
                f"{method:<18} lr {lr:<7g} eval {result['eval_loss']:.4f} step {result['step_s'] * 1e3:.0f} ms",
                flush=True,
            )
    best = {}
    for method in args.methods:
        candidates = [r for r in results if r["method"] == method and math.isfinite(r["eval_loss"])]
        if candidates:
            best[method] = min(candidates, key=lambda r: r["eval_loss"])
    elapsed = time.perf_counter() - began
    n_params = sum(p.numel() for p in _model(vocab, args, quantized=False).parameters())
    tokens = args.steps * args.batch * args.seq

    reference = best.get("adamw")
    lines = [
        "# Quality at equal token budget (small LLaMA, KJV, CPU)",
        "",
        f"Command: `python benchmarks/quality.py --steps {args.steps} --lrs {' '.join(f'{x:g}' for x in args.lrs)}` "
        f"({args.threads} thread(s), shared 2-core machine). Total wall time {elapsed / 60:.1f} min.",
        "",
        f"Model: LLaMA, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate}, "
        f"vocabulary compacted to the {vocab} GPT-2 ids present in the corpus: {n_params / 1e6:.2f}M parameters "
        "(far smaller than GaLore's 20M/60M, to fit the CPU budget). "
        f"Data: KJV, sequence {args.seq}, batch {args.batch}, {args.steps} steps = {tokens / 1e3:.0f}k tokens a run, "
        f"same order for every run; eval on {min(args.eval_blocks, heldout.shape[0])} held-out blocks from the end "
        f"of the text. Schedule: {args.warmup} warmup steps, cosine to 10%. Weight decay 0. GaLore / Q-GaLore: rank "
        f"{args.rank}, update gap {args.update_gap}, scale {args.scale}; Q-GaLore adds INT8 block weights "
        "(stochastic rounding), INT4 basis, 8-bit projected moments, adaptive refresh.",
        "",
        "## Best learning rate per method",
        "",
        "| method | best lr | eval loss | vs AdamW | perplexity | weights | optimizer states | bases | step time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in best.items():
        rel = f"{(r['eval_loss'] / reference['eval_loss'] - 1) * 100:+.2f}%" if reference else "n/a"
        lines.append(
            f"| {LABELS[method]} | {r['lr']:g} | {r['eval_loss']:.4f} | {rel} | {r['perplexity']:.1f} | "
            f"{r['live']['weights'] / 2**20:.2f} MiB | {r['live']['optimizer_states'] / 2**20:.2f} MiB | "
            f"{r['live']['projection_bases'] / 2**20:.3f} MiB | {r['step_s'] * 1e3:.0f} ms |"
        )
    lines += ["", "## Sweep (eval loss)", "", "| method | " + " | ".join(f"lr {x:g}" for x in args.lrs) + " |"]
    lines.append("|---|" + "---|" * len(args.lrs))
    for method in args.methods:
        cells = []
        for lr in args.lrs:
            r = next(x for x in results if x["method"] == method and x["lr"] == lr)
            cells.append(f"{r['eval_loss']:.4f}" if math.isfinite(r["eval_loss"]) else "diverged")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    args.output.mkdir(parents=True, exist_ok=True)
    if best:
        written = plot(best, args.output)
        lines += ["", "Plots: " + ", ".join(f"`benchmarks/results/{name}`" for name in written)]
    lines += [
        "",
        "Optimizer-state bytes are measured live tensors (the optimizer's state_dict walked, shared storages counted "
        "once). At this size the embedding and head (full-rank, plain optimizer) hold most of the state, so the "
        "low-rank saving on the block weights shows less than it does at 7B.",
    ]
    (args.output / "quality.md").write_text("\n".join(lines) + "\n")
    (args.output / "quality.json").write_text(json.dumps(results))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
