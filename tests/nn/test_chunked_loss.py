"""chunked_cross_entropy against F.cross_entropy on full fp32 logits: values, gradients, memory."""

import pytest
import torch
import torch.nn.functional as F

from lowrank_train.memory import measure_peak
from lowrank_train.nn.chunked_loss import causal_lm_loss, chunked_cross_entropy

# (dtype, tokens, vocab, hidden, chunk_size, reduction, ignored fraction)
CASES = [
    (torch.float32, 37, 50, 16, 1, "mean", 0.0),
    (torch.float32, 37, 50, 16, 7, "mean", 0.3),
    (torch.float32, 37, 50, 16, 64, "sum", 0.3),
    (torch.float32, 64, 300, 8, 16, "mean", 0.0),
    (torch.bfloat16, 48, 120, 32, 10, "mean", 0.2),
]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def _reference(hidden, weight, labels, reduction):
    logits = (hidden @ weight.mT).float()  # what LLaMA's loss does: matmul in the model dtype, then upcast
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize(("dtype", "tokens", "vocab", "width", "chunk", "reduction", "ignored"), CASES)
def test_matches_full_logits(dtype, tokens, vocab, width, chunk, reduction, ignored):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, width, generator=gen).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) / width**0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) < ignored] = -100
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    ref_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]

    loss = chunked_cross_entropy(*leaves, labels, chunk_size=chunk, reduction=reduction)
    ref = _reference(*ref_leaves, labels, reduction)
    loss.backward()
    ref.backward()

    tol = TOLERANCE[dtype]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, **tol)
    for ours, theirs in zip(leaves, ref_leaves, strict=True):
        assert ours.grad.dtype == dtype
        torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), **tol)


def test_upstream_gradient_scales_and_batch_dims():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    (3.0 * chunked_cross_entropy(hidden, weight, labels, chunk_size=3)).backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (3.0 * F.cross_entropy((hidden @ weight.mT).reshape(-1, 11), labels.reshape(-1))).backward()
    torch.testing.assert_close(ours[0], hidden.grad)
    torch.testing.assert_close(ours[1], weight.grad)


def test_all_ignored_is_nan_like_torch():
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    labels = torch.full((4,), -100)
    assert torch.isnan(chunked_cross_entropy(hidden, weight, labels))
    assert torch.isnan(F.cross_entropy(hidden @ weight.T, labels))


def test_causal_lm_loss_matches_model_loss(tiny_llama):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :3] = -100
    loss = causal_lm_loss(tiny_llama, ids, labels, chunk_size=5)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in tiny_llama.named_parameters()}
    tiny_llama.zero_grad()
    ref = tiny_llama(input_ids=ids, labels=labels).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, param in tiny_llama.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_tied_head_gets_both_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 9))
    causal_lm_loss(model, ids, chunk_size=4).backward()
    ours = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(ours, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_autocast_matches_the_head_under_the_same_autocast(hidden_dtype):
    """Issue 13 audit: under autocast the head's matmul runs in bf16 (in forward and in the backward
    recomputation) as LLaMA's nn.Linear head does, fp32 weights included; gradients come back in each input's
    dtype, and the hidden states are saved in bf16 (half the memory of an fp32 copy)."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(40, 16, generator=gen).to(hidden_dtype)
    weight = torch.randn(70, 16, generator=gen) / 4
    labels = torch.randint(0, 70, (40,), generator=gen)
    labels[:5] = -100
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    ref_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_cross_entropy(*leaves, labels, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(ref_leaves[0], ref_leaves[1]).float(), labels)
    assert [dtype for shape, dtype in saved if shape == (40, 16)] == [torch.bfloat16]
    loss.backward()
    ref.backward()
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(loss, ref, **tol)
    for ours, theirs in zip(leaves, ref_leaves, strict=True):
        assert ours.grad.dtype == ours.dtype
        torch.testing.assert_close(ours.grad, theirs.grad, **tol)


def test_causal_lm_loss_under_autocast_matches_model_loss(tiny_llama):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(tiny_llama, ids, chunk_size=5)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in tiny_llama.named_parameters()}
    tiny_llama.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = tiny_llama(input_ids=ids, labels=ids).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for name, param in tiny_llama.named_parameters():
        assert ours[name].dtype == torch.float32
        assert (ours[name] - param.grad).norm() <= 2e-2 * param.grad.norm() + 1e-7, name


def test_peak_memory_far_below_full_logits():
    tokens, vocab, width = 512, 4096, 16
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(tokens, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)

    def run(loss_fn):
        def step():
            loss_fn().backward()

        hidden.grad = weight.grad = None
        return measure_peak(step)[1]

    full = run(lambda: _reference(hidden, weight, labels, "mean"))
    chunked = run(lambda: chunked_cross_entropy(hidden, weight, labels, chunk_size=32))
    logits_bytes = tokens * vocab * 4
    assert full >= 2 * logits_bytes  # log-probabilities + their gradient at least
    assert chunked < logits_bytes / 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(reduction="none"), "reduction"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        chunked_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), **kwargs)


def test_shape_and_dtype_mismatch():
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="cast"):
        chunked_cross_entropy(torch.randn(3, 4), torch.randn(5, 4).bfloat16(), torch.zeros(3, dtype=torch.long))
