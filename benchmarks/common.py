"""Helpers shared by the benchmark scripts: thread control, LLaMA shapes, byte counting, tables."""

from __future__ import annotations

import os

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
