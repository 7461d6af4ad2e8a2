"""What the held-out guard of WeLore's default (``strategy="auto"``, issue 23) costs on SmolLM2-135M, CPU.

Compresses SmolLM2-135M-Instruct (the ``smollm2-offline`` folder converted once by ``lowrank_train.pretrained``)
with each guard candidate forced and with the guard, on the same KJV calibration windows, and reports the seconds
of each, the guard's held-out losses and winner, and the perplexity of every result on held-out KJV text. Run::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/welore_guard.py --threads 1
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import to take effect

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lowrank_train.data.corpora import load_corpus  # noqa: E402
from lowrank_train.pretrained import smollm2_offline  # noqa: E402
from lowrank_train.welore import GUARDED, WeLoreConfig, compress_model, guard_candidates, heldout_loss  # noqa: E402


def _windows(ids: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - length, (count,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--eval-seqs", type=int, default=16)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/welore_guard.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, tokenizer = smollm2_offline(torch.float32)
    dense.eval()
    text = load_corpus("kjv")
    split = int(len(text) * 0.9)
    heldout_ids = torch.tensor(tokenizer(text[split:][:200_000])["input_ids"])
    heldout = list(heldout_ids[: args.eval_seqs * args.eval_len].view(args.eval_seqs, 1, args.eval_len))
    train_ids = torch.tensor(tokenizer(text[:split])["input_ids"])
    calibration = _windows(train_ids, args.calib_seqs, args.calib_len, torch.Generator().manual_seed(0))

    rows = []
    for strategy in (*guard_candidates(), GUARDED):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = compress_model(model, WeLoreConfig(args.target, strategy, num_threads=args.threads), calibration)
        seconds = time.perf_counter() - start
        ppl = math.exp(heldout_loss(model, heldout))
        rows.append((strategy, report, seconds, ppl))
        print(f"{strategy}: {seconds:.1f} s, held-out KJV perplexity {ppl:.2f}", flush=True)
        if report.guard is not None:
            print(report.guard.summary(), flush=True)
        del model

    guard = rows[-1][1].guard
    unguarded = {strategy: seconds for strategy, _, seconds, _ in rows[:-1]}
    lines = [
        "# WeLore's guarded default: cost on SmolLM2-135M (CPU)",
        "",
        f"Target {args.target:.0%} of the block-linear parameters; calibration {args.calib_seqs} x {args.calib_len} "
        f"KJV tokens (the guard fits on {guard.fit_sequences}, scores on {guard.heldout_sequences}); "
        f"perplexity on {args.eval_seqs} x {args.eval_len} held-out KJV tokens; {args.threads} thread(s) of a "
        "shared CPU.",
        "",
        "| strategy | seconds | held-out perplexity |",
        "| --- | --- | --- |",
        *[f"| {strategy} | {seconds:.1f} | {ppl:.2f} |" for strategy, _, seconds, ppl in rows],
        "",
        f"- {guard.summary()}",
        f"- guard / sum of the unguarded candidates: {rows[-1][2] / sum(unguarded.values()):.2f}; "
        f"guard / {rows[-1][1].guard.winner} alone: {rows[-1][2] / unguarded[guard.winner]:.2f}",
        "",
    ]
    Path(args.output).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
