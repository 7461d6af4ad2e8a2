"""Build a LLaMA on the meta device and materialise it layer by layer, optionally straight into INT8 layers.

Why (issue 8): ``LlamaForCausalLM(config).to(bfloat16)`` allocates the whole model in fp32 first (27 GB for 7B),
and even a bf16 build holds 13.5 GB before :func:`~lowrank_train.nn.quantize_model` can shrink it to 6.7 GB. Here
the module tree is created on ``meta`` (no storage), then each decoder layer's linear weights are drawn in fp32
one at a time, quantized into a :class:`~lowrank_train.nn.QuantLinear` and dropped, so the peak is the final model
plus one fp32 linear weight and its quantization temporaries.

Initialisation follows Hugging Face's ``_init_weights`` for LLaMA: normal(0, ``initializer_range``) for linear and
embedding weights (the padding row zeroed), ones for RMSNorm; RoPE buffers are recomputed on the target device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lowrank_train.nn.quant_linear import QuantLinear, quantization_targets
from lowrank_train.nn.surgery import TargetModules, find_blocks, replace_module
from lowrank_train.quant import DEFAULT_GROUP_SIZE, WEIGHT_BITS, check_bits


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_meta_llama(config: object, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A ``LlamaForCausalLM`` whose parameters and buffers live on the meta device (no memory).

    Args:
        config: a ``transformers.LlamaConfig``.
        dtype: dtype the parameters will have once materialised.
    """
    from transformers import LlamaForCausalLM

    with torch.device("meta"), _default_dtype(dtype):
        return LlamaForCausalLM(config)


def _materialize_linear(
    linear: nn.Linear,
    std: float,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    weight_bits: int | None,
    weight_group_size: int,
) -> nn.Module:
    # Draw in fp32 (as HF does before a dtype cast) so a quantized layer is rounded from the exact value.
    weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.float32, device=device)
    weight.normal_(0.0, std, generator=generator)
    bias = linear.bias is not None
    if weight_bits is None:
        built = nn.Linear(linear.in_features, linear.out_features, bias=bias, device="meta", dtype=dtype)
        built.weight = nn.Parameter(weight.to(dtype))
    else:
        carrier = nn.Linear(linear.in_features, linear.out_features, bias=bias, device="meta", dtype=torch.float32)
        carrier.weight = nn.Parameter(weight)
        carrier.bias = nn.Parameter(torch.zeros(linear.out_features, device=device)) if bias else None
        built = QuantLinear.from_linear(carrier, bits=weight_bits, group_size=weight_group_size).to(dtype)
        del carrier
    if bias and weight_bits is None:
        built.bias = nn.Parameter(torch.zeros(linear.out_features, device=device, dtype=dtype))
    return built


def _materialize_small(module: nn.Module, std: float, generator: torch.Generator, device: torch.device) -> None:
    """Embeddings (normal, padding row zero) and norms (ones) of one module, not recursing into linears."""
    module.to_empty(device=device, recurse=False)
    with torch.no_grad():
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std, generator=generator)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif "RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__:
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        else:
            for param in module.parameters(recurse=False):
                param.normal_(0.0, std, generator=generator)


def materialize_llama(
    config: object,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    weight_bits: int | None = None,
    weight_group_size: int = DEFAULT_GROUP_SIZE,
    target_modules: TargetModules = None,
    seed: int = 0,
) -> nn.Module:
    """Builds a randomly initialised ``LlamaForCausalLM`` without ever holding the full-precision model.

    Args:
        config: a ``transformers.LlamaConfig``.
        dtype: dtype of float parameters and of the quantized layers' gradients.
        device: where the weights are materialised.
        weight_bits: ``None`` for float linear layers, 8 (Q-GaLore's INT8) or 4 for :class:`QuantLinear` layers.
        weight_group_size: elements per quantization group.
        target_modules: with ``weight_bits``, the linear layers built quantized, with the meaning
            ``quantize_model`` gives it (:func:`lowrank_train.nn.surgery.find_target_modules`): ``None`` for all
            linear layers inside the decoder blocks (never the LM head), ``"all-linear"``, a regular expression
            on qualified names, or a list of names / dotted suffixes (``["q_proj", "down_proj"]``).
        seed: seeds the weight draws; the same seed gives the same model.

    Returns:
        The model, in training mode, with no meta tensors left.

    Raises:
        ValueError: bad ``weight_bits`` or ``target_modules`` (one that matches nothing or selects the tied LM
            head), or a model with meta tensors left after materialisation.
    """
    weight_bits = check_bits(weight_bits, WEIGHT_BITS, name="weight_bits")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    device = torch.device(device)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    generator = torch.Generator(device=device).manual_seed(seed)
    model = build_meta_llama(config, dtype)
    # Targets are chosen on the meta model, by the same rule quantize_model applies to a built one.
    quantized = set(quantization_targets(model, target_modules)) if weight_bits is not None else set()
    body = model.get_decoder()
    _materialize_small(body.embed_tokens, std, generator, device)
    for block_name, block in find_blocks(model).items():  # one block at a time: peak is one fp32 linear more
        for name, child in list(block.named_modules()):
            if isinstance(child, nn.Linear):
                full_name = f"{block_name}.{name}"
                bits = weight_bits if full_name in quantized else None
                built = _materialize_linear(child, std, generator, device, dtype, bits, weight_group_size)
                replace_module(model, full_name, built)
            elif not isinstance(child, QuantLinear) and any(True for _ in child.parameters(recurse=False)):
                _materialize_small(child, std, generator, device)
    _materialize_small(body.norm, std, generator, device)
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    if getattr(config, "tie_word_embeddings", False):
        head.weight = body.embed_tokens.weight
    else:
        bits = weight_bits if head_name in quantized else None
        replace_module(
            model, head_name, _materialize_linear(head, std, generator, device, dtype, bits, weight_group_size)
        )
    # RoPE's inv_freq is a computed, non-persistent buffer: rebuild it for real (fp32, as HF computes it).
    with _default_dtype(torch.float32):
        body.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"materialize_llama left meta tensors behind: {left[:5]}")
    return model.train()
