"""Optimizer-step time and optimizer-state bytes on the LLaMA-60M shapes, ours next to the references; basis refreshes.

Run:  .venv/bin/python benchmarks/optimizer_step.py [--threads 1] [--rank 128] [--layer-threads 2] [--layer-full]

Prints (and writes to benchmarks/results/optimizer_step.md):
1. median step time, refresh and non-refresh steps separately, and optimizer-state bytes for fused torch AdamW,
   bitsandbytes AdamW8bit, galore-torch's GaLoreAdamW (skipped when not installed) and ours, same rank and gap;
   then the "random" projector's non-refresh step against the "svd" projector's, interleaved step by step, and the
   cost of the per-step non-finite gradient check (issue 12 item 4);
2. a refresh on one large gradient: torch.linalg.svd (the previous exact basis) vs the exact float64-Gram basis
   and the randomized SVD;
3. the refresh of a LLaMA-7B layer's seven matrices at rank 1024, per matrix and batched (issue 14 item 3).
Wall time on a shared 2-core machine depends on what else runs; the CPU seconds of this process do not (as much), so
both are printed and the ratios use CPU time where noted. All numbers of one table come from the same run.
"""

from __future__ import annotations

import os

# Idle OpenMP workers must sleep, not spin, or a 2-thread run on a shared 2-core machine slows everyone (set before
# torch starts its thread pool).
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import llama_weight_shapes, markdown_table, mib, set_threads, tensor_bytes, warm_allocator  # noqa: E402
from torch import nn  # noqa: E402

from lowrank_train import APOLLOAdamW, APOLLOMini, GaLoreAdamW, GaLoreAdamW8bit  # noqa: E402
from lowrank_train.optim.functional import finite_flags  # noqa: E402
from lowrank_train.projection import (  # noqa: E402
    build_bases_batched,
    get_projector,
    orient,
    rsvd_basis,
    subspace_overlap,
    svd_basis,
)

LOWRANK_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# One LLaMA-7B decoder layer's projected weights (out x in) and the same-shape groups a batched refresh takes.
LAYER_7B = {
    "q": (4096, 4096),
    "k": (4096, 4096),
    "v": (4096, 4096),
    "o": (4096, 4096),
    "gate": (11008, 4096),
    "up": (11008, 4096),
    "down": (4096, 11008),
}
LAYER_7B_BATCHES = (("q", "k", "v", "o"), ("gate", "up"), ("down",))


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


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
    for projector in ("svd", "rsvd", "random"):
        if kind == f"ours GaLoreAdamW ({projector})":
            groups[0]["projector"] = projector
            return GaLoreAdamW(groups, lr=lr)
    if kind == "ours GaLoreAdamW8bit (rsvd)":
        groups[0]["projector"] = "rsvd"
        return GaLoreAdamW8bit(groups, lr=lr)
    raise ValueError(kind)


def time_steps(opt, params, grads, steps: int, gap: int) -> tuple[float, float, float]:
    """Median seconds of refresh steps (step % gap == 0), of the other steps, and CPU seconds of the other steps."""
    refresh, plain, plain_cpu = [], [], []
    for step in range(steps):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        wall, cpu, _ = timed(opt.step)
        if step % gap == 0:
            refresh.append(wall)
        else:
            plain.append(wall)
            plain_cpu.append(cpu)
    skip = 1 if len(plain) > 2 else 0  # the first non-refresh step still warms caches
    return statistics.median(refresh), statistics.median(plain[skip:]), statistics.median(plain_cpu[skip:])


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


def paired_projector_steps(lowrank, plain, grads, rank: int, pairs: int) -> dict[str, float]:
    """Non-refresh steps of the "random" and "svd" projectors, alternated step by step on two copies of the model.

    Alternating puts both under the same machine load; the ratio is the median of the per-pair ratios.
    """
    runs = {}
    for projector in ("svd", "random"):
        low = [nn.Parameter(p.detach().clone()) for p in lowrank]
        rest = [nn.Parameter(p.detach().clone()) for p in plain]
        groups = [{"params": low, "rank": rank, "update_gap": 10**6, "scale": 0.25, "projector": projector}]
        runs[projector] = (low + rest, GaLoreAdamW([*groups, {"params": rest}], lr=1e-3))
    times: dict[str, list[tuple[float, float]]] = {"svd": [], "random": []}
    for i in range(pairs + 2):  # step 0 builds the svd basis, step 1 warms up: neither is counted
        for projector, (params, opt) in runs.items():
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            wall, cpu, _ = timed(opt.step)
            if i >= 2:
                times[projector].append((wall, cpu))
    svd, rnd = times["svd"], times["random"]
    return {
        "svd_ms": statistics.median(w for w, _ in svd) * 1e3,
        "random_ms": statistics.median(w for w, _ in rnd) * 1e3,
        "svd_cpu_ms": statistics.median(c for _, c in svd) * 1e3,
        "wall_ratio": statistics.median(r[0] / s[0] for r, s in zip(rnd, svd, strict=True)),
        "cpu_ratio": statistics.median(r[1] / s[1] for r, s in zip(rnd, svd, strict=True)),
        "wall_ratio_min": min(r[0] / s[0] for r, s in zip(rnd, svd, strict=True)),
        "wall_ratio_max": max(r[0] / s[0] for r, s in zip(rnd, svd, strict=True)),
    }


def nonfinite_check_ms(grads: list[torch.Tensor], repeats: int = 9) -> tuple[float, float]:
    """Median CPU milliseconds of the GaLore step's NaN/Inf check over every gradient (``finite_flags``, one host
    sync) and of an inf-norm check (the first version of the check, ~10x slower on the CPU)."""

    def by_inf_norm() -> bool:
        return bool(torch.stack([torch.linalg.vector_norm(g, float("inf")) for g in grads]).isfinite().all())

    ours = statistics.median(timed(lambda: bool(finite_flags(grads).all()))[1] for _ in range(repeats))
    alternative = statistics.median(timed(by_inf_norm)[1] for _ in range(repeats))
    return ours * 1e3, alternative * 1e3


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
        "ours GaLoreAdamW (random)",
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
        t_refresh, t_step, cpu_step = time_steps(opt, params, grads, args.steps, args.gap)
        low_bytes, total_bytes = state_split(opt, lowrank)
        results[kind] = (t_refresh, t_step, low_bytes, total_bytes)
        rows.append(
            [
                kind,
                f"{t_step * 1e3:.1f}",
                f"{cpu_step * 1e3:.1f}",
                f"{t_refresh * 1e3:.1f}",
                mib(low_bytes),
                mib(total_bytes),
            ]
        )
        del opt
        print(rows[-1], flush=True)

    header = [
        "optimizer",
        "step ms (no refresh)",
        "step CPU ms (no refresh)",
        "step ms (refresh)",
        "state MiB (low-rank group)",
        "state MiB",
    ]
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
    paired = paired_projector_steps(lowrank, plain, grads, args.rank, args.pairs)
    verdict = "met" if paired["cpu_ratio"] <= 1.1 and paired["wall_ratio"] <= 1.1 else "missed"
    out.append(
        f"- non-refresh step, random / svd projector (issue 14 item 3; {args.pairs} interleaved pairs, no refresh): "
        f"{paired['random_ms']:.1f} vs {paired['svd_ms']:.1f} ms, ratio {paired['wall_ratio']:.3f} wall "
        f"(pairs {paired['wall_ratio_min']:.2f}-{paired['wall_ratio_max']:.2f}), {paired['cpu_ratio']:.3f} CPU time "
        f"(target <= 1.1): {verdict}"
    )
    check_ms, inf_norm_ms = nonfinite_check_ms(grads)
    out.append(
        f"- non-finite gradient check of every step (issue 12 item 4: `finite_flags`, aminmax of all {len(grads)} "
        f"gradients, one host sync): {check_ms:.1f} CPU ms = {check_ms / paired['svd_cpu_ms'] * 100:.1f}% of the svd "
        f"projector's non-refresh step (CPU); the same check by an inf-norm would take {inf_norm_ms:.1f} CPU ms"
    )
    print("\n".join(out), flush=True)
    return out


# ----- APOLLO vs apollo-torch (issue 21) ----------------------------------------------------------------------
def apollo_optimizers(setting: str, lowrank: list[nn.Parameter], rank: int, **extra: object) -> tuple[object, object]:
    """(ours, apollo-torch's) for the projected group only; a gap no run reaches, so every timed step is a
    non-refresh step. apollo-torch's ``scale`` multiplies by its square root: 128 there is alpha sqrt(128) here.
    ``extra``: group options of ours (``proj_dtype``)."""
    import apollo_torch

    ours_params = [nn.Parameter(p.detach().clone()) for p in lowrank]
    theirs_params = [nn.Parameter(p.detach().clone()) for p in lowrank]
    gap = 10**6
    if setting == "APOLLO":
        group = {"params": ours_params, "rank": rank, "update_gap": gap, **extra}
        ours = APOLLOAdamW([group], lr=1e-3, weight_decay=0.0)
        theirs_group = {"rank": rank, "scale_type": "channel", "scale": 1.0}
    else:
        ours = APOLLOMini([{"params": ours_params, "rank": 1, "update_gap": gap, **extra}], lr=1e-3, weight_decay=0.0)
        theirs_group = {"rank": 1, "scale_type": "tensor", "scale": 128.0}
    group = {"params": theirs_params, "proj": "random", "proj_type": "std", "update_proj_gap": gap, **theirs_group}
    theirs = apollo_torch.APOLLOAdamW([group], lr=1e-3, weight_decay=0.0)  # both without decay: no extra pass
    return (ours, ours_params), (theirs, theirs_params)


def interleaved_steps(runs: dict[str, tuple[Callable[[], object], list[nn.Parameter]]], grads, pairs: int):
    """Per run (a step function and its parameters), (wall, CPU) seconds of ``pairs`` steps taken alternately (after
    2 untimed: the first builds the projection), so all see the same machine load."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for i in range(pairs + 2):
        for name, (step, params) in runs.items():
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            wall, cpu, _ = timed(step)
            if i >= 2:
                times[name].append((wall, cpu))
    return times


def projected_state_bytes(opt, params) -> int:
    """Every tensor the optimizer keeps for ``params``: ours also holds the inner moments under the shadows and the
    random basis it keeps between refreshes (not state); apollo-torch's projector object (its stored random matrix)
    is counted through its attributes."""
    if hasattr(opt, "_base"):
        return (
            tensor_bytes([opt.state[p] for p in params])
            + tensor_bytes([opt._base.state[opt._shadows[p]] for p in params])
            + tensor_bytes([opt._seeded_bases.get(p) for p in params])
        )
    return tensor_bytes([opt.state[p] for p in params])


def apollo_table(args: argparse.Namespace) -> list[str]:
    """Section 4 of the module docstring."""
    if importlib.util.find_spec("apollo_torch") is None:
        message = "skipping the APOLLO table: apollo-torch is not installed (pip install apollo-torch)"
        print(message, flush=True)
        return ["", f"## APOLLO vs apollo-torch: {message}"]
    lowrank, _ = build_params(args.size)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in lowrank]
    adamw_bytes = sum(2 * p.numel() * 4 + 4 for p in lowrank)  # torch AdamW: two fp32 moments and a step per weight
    rows, notes = [], []
    for setting in ("APOLLO", "APOLLO-Mini"):
        (ours, ours_params), (theirs, theirs_params) = apollo_optimizers(setting, lowrank, args.rank)
        (bf16, bf16_params), _ = apollo_optimizers(setting, lowrank, args.rank, proj_dtype="bfloat16")
        # The third run skips our per-step NaN/Inf check (apollo-torch has none): it shows that check's share. The
        # fourth computes R = P^T G in bf16 (an option, not the default: it rounds G and P for that product).
        runs = {
            "ours": (ours.step, ours_params),
            "apollo-torch": (theirs.step, theirs_params),
            "ours, no NaN/Inf check": (lambda opt=ours: opt.step(check_finite=False), ours_params),
            "ours, proj_dtype=bfloat16": (bf16.step, bf16_params),
        }
        times = interleaved_steps(runs, grads, args.apollo_pairs)

        def ratio(name: str, column: int, times=times) -> float:
            pairs = zip(times[name], times["apollo-torch"], strict=True)
            return statistics.median(o[column] / t[column] for o, t in pairs)

        cpu_ratio, wall_ratio = ratio("ours", 1), ratio("ours", 0)
        rank = args.rank if setting == "APOLLO" else 1
        optimizers = {
            "ours": ours,
            "apollo-torch": theirs,
            "ours, no NaN/Inf check": ours,
            "ours, proj_dtype=bfloat16": bf16,
        }
        for name, (_, params) in runs.items():
            opt = optimizers[name]
            state = projected_state_bytes(opt, params)
            rows.append(
                [
                    f"{name} {setting} (rank {rank}, {'channel' if setting == 'APOLLO' else 'tensor'})",
                    f"{statistics.median(w for w, _ in times[name]) * 1e3:.1f}",
                    f"{statistics.median(c for _, c in times[name]) * 1e3:.1f}",
                    f"{state / 2**20:,.3f}",
                    f"{state / adamw_bytes * 100:.3f}%",
                ]
            )
            print(rows[-1], flush=True)
        target = "met" if cpu_ratio <= 0.8 else "missed"
        notes.append(
            f"- {setting} non-refresh step, ours / apollo-torch ({args.apollo_pairs} interleaved pairs): "
            f"{cpu_ratio:.2f}x CPU time, {wall_ratio:.2f}x wall (target <= 0.8): {target}; without our per-step "
            f"NaN/Inf check {ratio('ours, no NaN/Inf check', 1):.2f}x CPU time; with `proj_dtype='bfloat16'` "
            f"{ratio('ours, proj_dtype=bfloat16', 1):.2f}x CPU time"
        )
        if setting == "APOLLO-Mini":
            mini = projected_state_bytes(ours, ours_params) / adamw_bytes * 100
            verdict = "met" if mini < 1 else "missed"
            notes.append(f"- APOLLO-Mini projected-group state, ours: {mini:.3f}% of AdamW's (target < 1%): {verdict}")
        del ours, theirs, bf16
    header = ["optimizer (projected group only)", "step ms", "step CPU ms", "kept MiB", "kept / AdamW's state"]
    n_low = sum(p.numel() for p in lowrank)
    out = [
        "",
        f"## APOLLO vs apollo-torch, LLaMA-{args.size} projected weights ({len(lowrank)} tensors, {n_low / 1e6:.1f}M "
        f"params), CPU, {args.threads} thread(s), median of {args.apollo_pairs} interleaved non-refresh steps",
        "",
        "Both optimizers hold only the projected (attention and MLP) weights: the other parameters take plain AdamW "
        f"on both sides, without weight decay. Kept: every tensor held between steps for this group (state, and the "
        f"random projection both keep between refreshes). AdamW's state for it: {adamw_bytes / 2**20:,.1f} MiB.",
        "",
        markdown_table(header, rows),
        "",
        *notes,
    ]
    print("\n".join(out), flush=True)
    return out


def gradient_with_spectrum(shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A gradient-like matrix: decaying spectrum (1 to 1e-3) on random singular vectors.
    m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    s = torch.logspace(0, -3, k)
    return (u * s) @ v.T


def refresh_comparison(shape: tuple[int, int], rank: int, repeats: int, with_torch_svd: bool) -> list[list[object]]:
    grad = gradient_with_spectrum(shape, seed=1)
    methods = [
        ("svd (exact): float64 Gram + eigh, the svd projector now", lambda: svd_basis(grad, rank)),
        ("rsvd, 1 power iter", lambda: rsvd_basis(grad, rank, torch.Generator().manual_seed(0), power_iters=1)),
        ("rsvd, 2 power iters", lambda: rsvd_basis(grad, rank, torch.Generator().manual_seed(0), power_iters=2)),
    ]
    if with_torch_svd:
        previous = ("svd (exact): torch.linalg.svd, the svd projector before", lambda: torch_svd_basis(grad, rank))
        methods.insert(0, previous)
    rows = []
    ref_basis, ref_cpu = None, None
    for label, fn in methods:
        runs = [timed(fn) for _ in range(repeats)]
        wall, cpu, basis = min(runs, key=lambda r: r[1])
        if ref_basis is None:
            ref_basis, ref_cpu = basis, cpu
        overlap = float(subspace_overlap(ref_basis, basis))
        # Share of the gradient energy the reference's top-r basis captures that this basis captures too.
        energy = float((basis.T @ grad).square().sum() / (ref_basis.T @ grad).square().sum())
        rows.append([label, f"{wall:.2f}", f"{cpu:.2f}", f"{ref_cpu / cpu:.1f}x", f"{overlap:.4f}", f"{energy:.4f}"])
        print(rows[-1], flush=True)
    return rows


def torch_svd_basis(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The svd projector before issue 14: a full ``torch.linalg.svd`` (U, S and the thrown-away Vh) in fp32."""
    return torch.linalg.svd(matrix.float(), full_matrices=False)[0][:, :rank]


def layer_7b_gradients() -> dict[str, torch.Tensor]:
    """Gradient-like matrices of the 7B layer's shapes, oriented (4096 x cols): a rank-256 signal plus noise."""
    grads = {}
    for i, (name, shape) in enumerate(LAYER_7B.items()):
        gen = torch.Generator().manual_seed(100 + i)
        m, n = shape
        signal = torch.randn(m, 256, generator=gen) @ torch.randn(256, n, generator=gen)
        grads[name] = orient(signal.add_(torch.randn(m, n, generator=gen), alpha=4.0)).contiguous()
    return grads


def captured(basis: torch.Tensor, grad: torch.Tensor) -> float:
    """||P^T G||_F^2: the gradient energy a basis keeps."""
    return float((basis.T @ grad).square().sum())


def layer_7b_refresh(rank: int, full: bool) -> tuple[list[str], list[list[object]]]:
    """Times each kind's refresh of the 7B layer per matrix and batched; returns (notes, table rows)."""
    grads = layer_7b_gradients()
    seeds = {name: i for i, name in enumerate(LAYER_7B)}
    options = {"svd": {}, "rsvd": {"oversample": 8, "power_iters": 1}}
    # The exact basis of a 4096 x 11008 matrix costs ~30 CPU-s and a 4096 x 4096 one ~25: on a shared 2-core machine
    # the whole layer twice (per matrix and batched) is far past 10 minutes, so by default "svd" times a subset.
    svd_subset = {"q", "k", "down"} if not full else set(LAYER_7B)
    svd_batches = LAYER_7B_BATCHES if full else (("q", "k"),)
    rows, per_matrix_cpu, bases = [], {}, {}
    for kind_name in ("svd", "rsvd"):
        kind, opts = get_projector(kind_name), options[kind_name]
        names = [n for n in LAYER_7B if kind_name == "rsvd" or n in svd_subset]
        for name in names:
            gen = torch.Generator().manual_seed(seeds[name])
            wall, cpu, basis = timed(lambda g=gen, n=name, k=kind, o=opts: k.build(grads[n], rank, g, **o))
            per_matrix_cpu[kind_name, name] = (wall, cpu)
            bases[kind_name, name] = basis
            print(f"{kind_name} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
        for batch in LAYER_7B_BATCHES if kind_name == "rsvd" else svd_batches:
            gens = [torch.Generator().manual_seed(seeds[n]) for n in batch]
            wall, cpu, batched = timed(
                lambda b=batch, g=gens, k=kind, o=opts: build_bases_batched(k, [grads[n] for n in b], rank, g, **o)
            )
            single_wall = sum(per_matrix_cpu[kind_name, n][0] for n in batch)
            single_cpu = sum(per_matrix_cpu[kind_name, n][1] for n in batch)
            diff = max(float((batched[i] - bases[kind_name, n]).abs().max()) for i, n in enumerate(batch))
            energy = [
                captured(bases[kind_name, n], grads[n]) / captured(bases["svd", n], grads[n])
                for n in batch
                if ("svd", n) in bases
            ]
            shape = tuple(grads[batch[0]].shape)
            rows.append(
                [
                    kind_name,
                    ", ".join(batch),
                    f"{shape[0]} x {shape[1]}",
                    f"{single_wall:.1f} / {single_cpu:.1f}",
                    f"{wall:.1f} / {cpu:.1f}",
                    f"{single_cpu / cpu:.2f}x",
                    f"{diff:.1e}",
                    f"{min(energy):.4f}" if energy else "-",
                ]
            )
            print(rows[-1], flush=True)
    notes = []
    rsvd_layer = sum(per_matrix_cpu["rsvd", n][1] for n in LAYER_7B)
    if full:
        svd_layer = sum(per_matrix_cpu["svd", n][1] for n in LAYER_7B)
        how = "measured"
    else:
        square = (per_matrix_cpu["svd", "q"][1] + per_matrix_cpu["svd", "k"][1]) / 2
        svd_layer = 4 * square + 3 * per_matrix_cpu["svd", "down"][1]
        how = "estimated as 4 x mean(q, k) + 3 x down (gate and up have down's oriented shape)"
    notes.append(
        f"- one layer's seven refreshes, per matrix, CPU seconds: svd {svd_layer:.0f} ({how}), rsvd {rsvd_layer:.0f} "
        f"(measured): rsvd is {svd_layer / rsvd_layer:.1f}x cheaper; x 32 layers = {32 * svd_layer / 60:.0f} vs "
        f"{32 * rsvd_layer / 60:.0f} CPU-minutes per refresh of the whole 7B model on this machine"
    )
    return notes, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=5, help="refresh gap used for timing (refresh steps are timed)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=12, help="interleaved random/svd step pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refresh-shape", default="4096x11008")
    parser.add_argument("--refresh-rank", type=int, default=1024)
    parser.add_argument("--refresh-repeats", type=int, default=1)
    parser.add_argument("--no-torch-svd", action="store_true", help="skip the torch.linalg.svd reference (~4 min)")
    parser.add_argument("--layer-threads", type=int, default=2, help="threads of the 7B-layer refresh table")
    parser.add_argument("--layer-rank", type=int, default=1024)
    parser.add_argument("--layer-full", action="store_true", help="time every 7B matrix with svd too (~15+ min)")
    parser.add_argument("--skip-layer", action="store_true", help="skip the 7B-layer refresh table")
    parser.add_argument("--only-refresh", action="store_true", help="skip the step table, time the refreshes only")
    parser.add_argument("--only-apollo", action="store_true", help="only the APOLLO vs apollo-torch table")
    parser.add_argument("--apollo-pairs", type=int, default=6, help="interleaved ours/apollo-torch step pairs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "optimizer_step.md"))
    args = parser.parse_args()
    set_threads(args.threads)
    warm_allocator()  # every optimizer is timed as in a training process, not in a cold heap
    load_at_start = os.getloadavg()[0]

    if args.only_apollo:
        out = apollo_table(args)
        conditions = (
            f"Run conditions: load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end on "
            f"{os.cpu_count()} cores; ratios from CPU time of interleaved steps; the allocator warmed first "
            "(common.warm_allocator), as in a training process."
        )
        path = Path(args.out).with_name("optimizer_step_apollo.md")
        path.write_text("\n".join([conditions, *out]) + "\n")
        return
    out: list[str] = []
    if not args.only_refresh:
        out = step_table(args) + apollo_table(args)
    shape = tuple(int(x) for x in args.refresh_shape.split("x"))
    refresh_rows = refresh_comparison(shape, args.refresh_rank, args.refresh_repeats, not args.no_torch_svd)
    out += [
        "",
        f"## One basis refresh on a {shape[0]} x {shape[1]} gradient at rank {args.refresh_rank} "
        f"({args.threads} thread(s), best of {args.refresh_repeats})",
        "",
        markdown_table(
            [
                "method",
                "seconds",
                "CPU seconds",
                "speed-up vs first row (CPU)",
                "subspace overlap with first row",
                "captured energy vs first row",
            ],
            refresh_rows,
        ),
    ]
    print("\n".join(out[-4:]), flush=True)
    if not args.skip_layer:
        set_threads(args.layer_threads)
        notes, layer_rows = layer_7b_refresh(args.layer_rank, args.layer_full)
        subset = "" if args.layer_full else "; svd: a subset (q, k per matrix and batched, down), see below"
        out += [
            "",
            f"## Refresh of one LLaMA-7B layer's seven matrices at rank {args.layer_rank} ({args.layer_threads} "
            f"threads, OMP_WAIT_POLICY=PASSIVE, one run{subset})",
            "",
            "Matrices are oriented (4096 x cols); gate and up (11008 x 4096) are refreshed as their transposes. "
            "Batched: one `build_bases_batched` call per same-shape group. Times are wall / CPU seconds of this "
            "process; the speed-up uses CPU time. max |diff|: batched basis vs the per-matrix one. Energy: the "
            "smallest share, over the group, of the exact basis's captured gradient energy.",
            "",
            markdown_table(
                [
                    "projector",
                    "matrices",
                    "oriented shape",
                    "per matrix, s (wall / CPU)",
                    "batched, s (wall / CPU)",
                    "batched speed-up (CPU)",
                    "max abs diff",
                    "energy vs svd",
                ],
                layer_rows,
            ),
            "",
            *notes,
        ]
        print("\n".join(out[-3:]), flush=True)
    conditions = (
        f"Run conditions: load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end on "
        f"{os.cpu_count()} cores. Where other jobs share the cores, wall times exceed the CPU times; then compare the "
        "CPU columns and the in-run ratios, not the wall times of earlier runs."
    )
    out = [conditions, "", *out]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if args.only_refresh and Path(args.out).exists() else "w"
    with open(args.out, mode) as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
