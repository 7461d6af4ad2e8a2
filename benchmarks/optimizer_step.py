"""Optimizer-step time and optimizer-state bytes on the LLaMA-60M shapes, ours next to the references.

Run:  OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/optimizer_step.py [--threads 1] [--rank 128]

Prints (and writes to benchmarks/results/optimizer_step.md):
1. median step time, refresh and non-refresh steps separately, and optimizer-state bytes for fused torch AdamW,
   bitsandbytes AdamW8bit, galore-torch's GaLoreAdamW (skipped when not installed) and ours, same rank and gap;
2. a refresh on one large gradient: exact SVD vs randomized SVD;
3. the state-bytes check of the low-rank group against r / min(m, n) of AdamW's plus the basis.
All numbers of one table come from the same run, so compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from common import llama_weight_shapes, markdown_table, mib, set_threads, tensor_bytes
from torch import nn

from lowrank_train import GaLoreAdamW, GaLoreAdamW8bit
from lowrank_train.projection import rsvd_basis, subspace_overlap, svd_basis

LOWRANK_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_params(size: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    lowrank, plain = [], []
    for name, shape in llama_weight_shapes(size):
        p = nn.Parameter(torch.randn(*shape, generator=gen) * 0.02)
        (lowrank if name.endswith(LOWRANK_MODULES) else plain).append(p)
    return lowrank, plain


def make_optimizer(kind: str, lowrank, plain, rank: int, gap: int, lr: float = 1e-3):
    if kind == "torch AdamW (fused)":
        return torch.optim.AdamW(lowrank + plain, lr=lr, fused=True)
    if kind == "bnb AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(lowrank + plain, lr=lr)
    if kind == "galore-torch GaLoreAdamW":
        from galore_torch import GaLoreAdamW as RefGaLore

        group = {"params": lowrank, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
        return RefGaLore([group, {"params": plain}], lr=lr)
    groups = [{"params": lowrank, "rank": rank, "update_gap": gap, "scale": 0.25}, {"params": plain}]
    if kind == "ours GaLoreAdamW (svd)":
        return GaLoreAdamW(groups, lr=lr)
    if kind == "ours GaLoreAdamW (rsvd)":
        groups[0]["projector"] = "rsvd"
        return GaLoreAdamW(groups, lr=lr)
    if kind == "ours GaLoreAdamW8bit (rsvd)":
        groups[0]["projector"] = "rsvd"
        return GaLoreAdamW8bit(groups, lr=lr)
    raise ValueError(kind)


def time_steps(opt, params, grads, steps: int, gap: int) -> tuple[float, float]:
    """Median seconds of refresh steps (step % gap == 0) and of the other steps."""
    refresh, plain = [], []
    for step in range(steps):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        start = time.perf_counter()
        opt.step()
        elapsed = time.perf_counter() - start
        (refresh if step % gap == 0 else plain).append(elapsed)
    return statistics.median(refresh), statistics.median(plain[1:] if len(plain) > 2 else plain)


def state_split(opt, lowrank) -> tuple[int, int]:
    """(bytes of the low-rank params' state, bytes of all optimizer state)."""
    total = tensor_bytes(opt.state) + (tensor_bytes(opt._base.state) if hasattr(opt, "_base") else 0)
    if hasattr(opt, "_base"):  # ours: projected moments live under the shadows
        low = tensor_bytes([opt.state[p] for p in lowrank]) + tensor_bytes(
            [opt._base.state[opt._shadows[p]] for p in lowrank]
        )
    else:
        low = tensor_bytes([opt.state[p] for p in lowrank])
    return low, total


def refresh_comparison(shape: tuple[int, int], rank: int, repeats: int) -> list[list[object]]:
    gen = torch.Generator().manual_seed(1)
    # A gradient-like matrix: decaying spectrum plus noise.
    m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    s = torch.logspace(0, -3, k)
    grad = (u * s) @ v.T
    del u, v
    rows = []
    exact_basis, exact_time = None, None
    for label, fn in [
        ("svd (exact)", lambda: svd_basis(grad, rank)),
        ("rsvd, 1 power iter", lambda: rsvd_basis(grad, rank, torch.Generator().manual_seed(0), power_iters=1)),
        ("rsvd, 2 power iters", lambda: rsvd_basis(grad, rank, torch.Generator().manual_seed(0), power_iters=2)),
    ]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            basis = fn()
            times.append(time.perf_counter() - start)
        t = min(times)
        if exact_basis is None:
            exact_basis, exact_time = basis, t
        overlap = float(subspace_overlap(exact_basis, basis))
        # Share of the gradient energy the exact top-r basis captures that this basis captures too.
        energy = float((basis.T @ grad).square().sum() / (exact_basis.T @ grad).square().sum())
        rows.append([label, f"{t:.2f}", f"{exact_time / t:.1f}x", f"{overlap:.4f}", f"{energy:.4f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=5, help="refresh gap used for timing (refresh steps are timed)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refresh-shape", default="4096x11008")
    parser.add_argument("--refresh-rank", type=int, default=1024)
    parser.add_argument("--refresh-repeats", type=int, default=1)
    parser.add_argument("--only-refresh", action="store_true", help="skip the step table, time the refresh only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "optimizer_step.md"))
    args = parser.parse_args()
    set_threads(args.threads)

    out: list[str] = []
    if not args.only_refresh:
        out = step_table(args)
    shape = tuple(int(x) for x in args.refresh_shape.split("x"))
    refresh_rows = refresh_comparison(shape, args.refresh_rank, args.refresh_repeats)
    out += [
        "",
        f"## One basis refresh on a {shape[0]} x {shape[1]} gradient at rank {args.refresh_rank} "
        f"({args.threads} thread(s), best of {args.refresh_repeats})",
        "",
        markdown_table(
            ["method", "seconds", "speed-up vs svd", "subspace overlap with svd", "captured energy vs svd"],
            refresh_rows,
        ),
    ]
    print("\n".join(out[-4:]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if args.only_refresh and Path(args.out).exists() else "w"
    with open(args.out, mode) as f:
        f.write("\n".join(out) + "\n")


def step_table(args: argparse.Namespace) -> list[str]:
    lowrank, plain = build_params(args.size)
    params = lowrank + plain
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    kinds = [
        "torch AdamW (fused)",
        "bnb AdamW8bit",
        "galore-torch GaLoreAdamW",
        "ours GaLoreAdamW (svd)",
        "ours GaLoreAdamW (rsvd)",
        "ours GaLoreAdamW8bit (rsvd)",
    ]
    rows, results = [], {}
    for kind in kinds:
        if kind.startswith("galore-torch") and importlib.util.find_spec("galore_torch") is None:
            print(f"skipping {kind}: galore-torch is not installed (pip install galore-torch)")
            continue
        for p in params:
            p.grad = None
        opt = make_optimizer(kind, lowrank, plain, args.rank, args.gap)
        t_refresh, t_step = time_steps(opt, params, grads, args.steps, args.gap)
        low_bytes, total_bytes = state_split(opt, lowrank)
        results[kind] = (t_refresh, t_step, low_bytes, total_bytes)
        rows.append([kind, f"{t_step * 1e3:.1f}", f"{t_refresh * 1e3:.1f}", mib(low_bytes), mib(total_bytes)])
        del opt

    header = ["optimizer", "step ms (no refresh)", "step ms (refresh)", "state MiB (low-rank group)", "state MiB"]
    n_low, n_all = sum(p.numel() for p in lowrank), sum(p.numel() for p in params)
    out = [
        f"## Optimizer step, LLaMA-{args.size} shapes ({len(params)} tensors, {n_all / 1e6:.1f}M"
        f" params, {n_low / 1e6:.1f}M in the low-rank group), rank {args.rank}, CPU, {args.threads} thread(s), "
        f"median of {args.steps} steps, refresh every {args.gap}",
        "",
        markdown_table(header, rows),
        "",
    ]
    ref = results.get("galore-torch GaLoreAdamW")
    ours = results.get("ours GaLoreAdamW (svd)")
    if ref and ours:
        out.append(f"- non-refresh step, ours / galore-torch: {ours[1] / ref[1]:.2f}x (target <= 1.0, aim 0.8)")
    adamw = results["torch AdamW (fused)"]
    basis_bytes = sum(min(p.shape) * args.rank * 4 for p in lowrank)
    bound = sum(args.rank / min(p.shape) * 2 * p.numel() * 4 for p in lowrank) + basis_bytes
    if ours:
        verdict = "met" if ours[2] <= bound * 1.001 else "missed"
        out.append(
            f"- low-rank group state: ours {mib(ours[2])} MiB vs bound r/min(m,n) x AdamW + basis = {mib(bound)} MiB "
            f"(AdamW {mib(adamw[2])} MiB): {verdict}"
        )
    print("\n".join(out), flush=True)
    return out


if __name__ == "__main__":
    main()
