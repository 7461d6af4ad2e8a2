"""Helpers shared by the benchmark scripts: thread control, LLaMA shapes, byte counting, tables."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# GaLore paper shapes (hidden, intermediate, layers, heads, vocab).
LLAMA_SHAPES = {
    "20m": (256, 688, 4, 4, 32000),
    "60m": (512, 1376, 8, 8, 32000),
    "130m": (768, 2048, 12, 12, 32000),
    "350m": (1024, 2736, 24, 16, 32000),
    "1b": (2048, 5461, 24, 32, 32000),
    "7b": (4096, 11008, 32, 32, 32000),
}


def warm_allocator(nbytes: int = 30 << 20) -> None:
    """Allocates, touches and frees ``nbytes`` once, as a training process's first forward pass does.

    glibc serves a large block with a fresh mmap (new pages, each faulted in on first touch) until a block of
    that size has been freed once; after that it raises its thresholds (up to 32 MiB) and recycles heap memory.
    A fresh benchmark process would otherwise charge page faults to whichever optimizer allocates more
    temporaries per step: on the APOLLO table apollo-torch's step was 30% slower cold than warm (APOLLO-Mini's 55%).
    """
    block = torch.empty(nbytes, dtype=torch.uint8)
    block.fill_(1)
    del block


def set_threads(threads: int) -> None:
    """Fixes the intra-op thread count: on a shared 2-core machine a 2-thread SVD next to a busy core can be 20-100x
    slower than 1 thread."""
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def llama_weight_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LLaMA parameter, untied head, no model built."""
    hidden, inter, layers, _, vocab = LLAMA_SHAPES[size]
    shapes = [("embed_tokens", (vocab, hidden))]
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"layers.{i}.{proj}", (hidden, hidden)))
        shapes += [
            (f"layers.{i}.gate_proj", (inter, hidden)),
            (f"layers.{i}.up_proj", (inter, hidden)),
            (f"layers.{i}.down_proj", (hidden, inter)),
            (f"layers.{i}.input_layernorm", (hidden,)),
            (f"layers.{i}.post_attention_layernorm", (hidden,)),
        ]
    shapes += [("norm", (hidden,)), ("lm_head", (vocab, hidden))]
    return shapes


def tensor_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (dicts, lists, tuples and plain objects' attributes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def compact_kjv_blocks(seq_len: int, max_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Train / held-out ``(N, seq_len)`` KJV blocks (GPT-2 tokenizer) with the vocabulary compacted to the ids that
    occur in the corpus (a bijective re-indexing: no token is lost), so a tiny model is not dominated by its head.

    ``max_vocab`` compacts further, lossily: the ``max_vocab - 1`` ids most frequent in the training split keep their
    own index (most frequent first) and every rarer id shares the last one, like an unknown-token bucket.
    """
    from lowrank_train.data import build_packed_corpus, load_tokenizer

    packed = build_packed_corpus("kjv", load_tokenizer("gpt2-offline"), seq_len=seq_len)
    used = torch.unique(torch.cat([packed.train.reshape(-1), packed.heldout.reshape(-1)]))
    if max_vocab is not None and max_vocab < used.numel():
        if max_vocab < 2:
            raise ValueError(f"max_vocab must be at least 2 (kept ids + the shared rare-id bucket), got {max_vocab}")
        counts = torch.bincount(packed.train.reshape(-1), minlength=int(used.max()) + 1)
        kept = counts.argsort(descending=True, stable=True)[: max_vocab - 1]
        remap = torch.full((int(used.max()) + 1,), max_vocab - 1, dtype=torch.long)
        remap[kept] = torch.arange(max_vocab - 1)
        return remap[packed.train], remap[packed.heldout], max_vocab
    remap = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    return remap[packed.train], remap[packed.heldout], used.numel()


def small_llama(
    vocab: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    seq: int,
    *,
    seed: int,
    tied: bool = False,
    quantized: bool = False,
) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM; ``quantized`` swaps its block linears for INT8 QuantLinear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_train.nn import quantize_model

    torch.manual_seed(seed)  # the same initial weights for every method
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=seq,
        tie_word_embeddings=tied,
        use_cache=False,
    )
    model = LlamaForCausalLM(config)
    if quantized:
        quantize_model(model, bits=8, group_size=256)  # Q-GaLore trains INT8 block weights
    return model


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% (GaLore's pretraining schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, heldout: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over all held-out blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, heldout.shape[0], batch):
        ids = heldout[start : start + batch]
        total += float(model(input_ids=ids, labels=ids).loss) * ids.shape[0]
        count += ids.shape[0]
    model.train()
    return total / count


def block_linear_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(block linear weights, everything else) in the split GaLore's groups use: the weights
    :func:`lowrank_train.lowrank_param_groups` projects, and the embeddings / norms / head (tied weights once)."""
    from lowrank_train import lowrank_param_groups

    groups = lowrank_param_groups(model, rank=1)
    block = [p for g in groups if "rank" in g for p in g["params"]]
    rest = [p for g in groups if "rank" not in g for p in g["params"]]
    return block, rest


def block_linear_share(model: torch.nn.Module) -> float:
    """Fraction of the model's (distinct) trainable parameters held by the block linear weights."""
    block, rest = block_linear_split(model)
    n_block = sum(p.numel() for p in block)
    return n_block / (n_block + sum(p.numel() for p in rest))


def per_group_lr_groups(
    model: torch.nn.Module, lr: float, block_ratio: float | Callable[[torch.nn.Parameter], float]
) -> list[dict]:
    """Plain param groups: the block linear weights at ``block_ratio * lr`` and everything else at ``lr``.

    This is the learning-rate split GaLore's groups imply (projected block weights updated at ``scale x lr``, the
    embeddings / norms / head at ``lr``), so a full-rank baseline tuned with it is a fair comparison.
    ``block_ratio`` may be a function of the weight (one group per distinct ratio).
    """
    block, rest = block_linear_split(model)
    ratio_of = block_ratio if callable(block_ratio) else (lambda weight: block_ratio)
    by_ratio: dict[float, list[torch.nn.Parameter]] = {}
    for weight in block:
        by_ratio.setdefault(float(ratio_of(weight)), []).append(weight)
    return [{"params": ps, "lr": lr * ratio} for ratio, ps in by_ratio.items()] + [{"params": rest, "lr": lr}]
