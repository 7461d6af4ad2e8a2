"""Model surgery: the repeated blocks of a model, the layers a ``target_modules`` value selects, replacing a module.

Every part of the package that picks layers (``lowrank_param_groups``, ``quantize_model``, ``materialize_llama``,
WeLore, the PEFT glue) or swaps one (``quantize_model``/``dequantize_model``, ``materialize_llama``, WeLore's
``compress_model``/``load_compressed``/``merge_lowrank``) goes through this module, so that a ``target_modules``
value means one thing everywhere (issue 11). The meaning is :func:`find_target_modules`'s docstring.

Everything here reads the module tree only (types, structure, parameter identity), never a model family's names,
so it works on meta-device models too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import Tensor, nn

__all__ = [
    "LINEAR_TYPES",
    "TargetModules",
    "block_modules",
    "find_blocks",
    "find_target_modules",
    "is_dense_linear",
    "is_linear",
    "matches_target",
    "output_layer_names",
    "register_linear_type",
    "replace_module",
]

TargetModules = str | Sequence[str] | None
"""``None`` (the blocks' layers), ``"all-linear"``, a regular expression, or a list of names / name suffixes."""

ALL_LINEAR = "all-linear"

# Module types whose 2-D ``weight`` counts as a linear weight (for param groups: a weight GaLore can project).
# ``lowrank_train.nn.quant_linear`` registers QuantLinear; other packages register theirs.
LINEAR_TYPES: list[type[nn.Module]] = [nn.Linear]


def register_linear_type(module_type: type[nn.Module]) -> None:
    """Makes :func:`is_linear` (and so ``lowrank_param_groups`` and ``"all-linear"``) accept ``module_type``.

    Args:
        module_type: an ``nn.Module`` subclass with a 2-D ``weight`` (e.g. transformers' ``Conv1D``).

    Raises:
        ValueError: if ``module_type`` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"register_linear_type needs an nn.Module subclass, got {module_type!r}")
    if module_type not in LINEAR_TYPES:
        LINEAR_TYPES.append(module_type)


def is_linear(module: nn.Module) -> bool:
    """An instance of a registered linear type (:data:`LINEAR_TYPES`) holding a 2-D ``weight``."""
    weight = getattr(module, "weight", None)
    return isinstance(module, tuple(LINEAR_TYPES)) and isinstance(weight, Tensor) and weight.dim() == 2


def is_dense_linear(module: nn.Module) -> bool:
    """Exactly ``nn.Linear``: the float layer that quantization and WeLore rebuild from its ``weight``.

    Subclasses are left out on purpose: bitsandbytes' ``Linear8bitLt`` keeps its own storage format, and
    ``nn.MultiheadAttention`` reads its ``out_proj`` (a subclass) weight directly instead of calling it.
    """
    return type(module) is nn.Linear


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's repeated blocks (its transformer layers), by qualified name, in module order.

    Blocks are found by structure, not by name: the entries of every outermost ``nn.ModuleList`` whose entries
    are composite modules (``model.layers`` in LLaMA, ``transformer.h`` in GPT-2, ``encoder.layer`` in BERT).
    A list nested inside a block (experts, heads) is part of that block; a list of leaf layers (per-codebook
    embeddings or output heads) holds no blocks.

    Args:
        model: any module tree (meta-device models included).

    Returns:
        Ordered mapping from qualified block name (``"model.layers.0"``) to the block; empty when there is none.
    """
    blocks: dict[str, nn.Module] = {}
    lists: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f"{outer}.") for outer in lists):
            continue
        entries = [(child_name, child) for child_name, child in module.named_children() if any(child.children())]
        if not entries:
            continue
        lists.append(name)
        prefix = f"{name}." if name else ""
        blocks.update((prefix + child_name, child) for child_name, child in entries)
    return blocks


def output_layer_names(model: nn.Module, candidate: Callable[[nn.Module], bool] = is_linear) -> set[str]:
    """Qualified names of the ``candidate`` layers that make up the output head, which ``"all-linear"`` leaves out.

    The output head is ``model.get_output_embeddings()`` when the model has one (Hugging Face models; a PEFT
    ``modules_to_save`` wrapper around it included); otherwise a layer outside the blocks whose ``out_features``
    equals an ``nn.Embedding``'s number of rows (the projection onto the vocabulary). A layer counts as part of
    the head when it is the head, lies inside it, or shares its weight with it or with an ``nn.Embedding`` (tied
    embeddings).

    Args:
        model: any module tree.
        candidate: which modules are layers (:func:`is_linear` or :func:`is_dense_linear`).

    Returns:
        The names (possibly empty).
    """
    named = [(name, module) for name, module in model.named_modules() if name and candidate(module)]
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    heads: list[nn.Module] = []
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Module):
        heads.append(head)
    else:
        vocab_sizes = {e.num_embeddings for e in embeddings}
        in_blocks = {id(m) for block in find_blocks(model).values() for m in block.modules()}
        heads += [m for _, m in named if id(m) not in in_blocks and getattr(m, "out_features", None) in vocab_sizes]
    inside_head = {id(m) for h in heads for m in h.modules()}
    tied = {id(h.weight) for h in heads if isinstance(getattr(h, "weight", None), Tensor)}
    tied.update(id(e.weight) for e in embeddings)
    return {name for name, m in named if id(m) in inside_head or id(getattr(m, "weight", None)) in tied}


def block_modules(model: nn.Module, candidate: Callable[[nn.Module], bool] = is_linear) -> dict[str, nn.Module]:
    """The ``candidate`` layers inside the repeated blocks (:func:`find_blocks`), output head excluded.

    Args:
        model: any module tree.
        candidate: which modules are layers (:func:`is_linear` or :func:`is_dense_linear`).

    Returns:
        Ordered mapping from qualified name to layer; empty when the blocks hold no such layer.
    """
    found: dict[str, nn.Module] = {}
    for block_name, block in find_blocks(model).items():
        for name, module in block.named_modules():
            if candidate(module):
                found.setdefault(f"{block_name}.{name}" if name else block_name, module)
    head = output_layer_names(model, candidate)
    return {name: module for name, module in found.items() if name not in head}


def _check_target_modules(target_modules: TargetModules) -> None:
    if target_modules is None:
        return
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            try:
                re.compile(target_modules)
            except re.error as error:
                raise ValueError(
                    f"target_modules={target_modules!r} is not a valid regular expression: {error}"
                ) from error
        return
    if isinstance(target_modules, Sequence) and all(isinstance(t, str) and t for t in target_modules):
        return
    raise ValueError(
        f"target_modules must be None, 'all-linear', a regular expression string, or a list of module names or "
        f"name suffixes (non-empty strings), got {target_modules!r}"
    )


def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """Whether the qualified module ``name`` is named by a regular expression or a list (see
    :func:`find_target_modules`; ``"all-linear"`` and ``None`` are selections, not patterns)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def find_target_modules(
    model: nn.Module,
    target_modules: TargetModules = None,
    *,
    candidate: Callable[[nn.Module], bool] = is_linear,
    match_name: Callable[[str], str] | None = None,
) -> dict[str, nn.Module]:
    """The layers that ``target_modules`` selects: the one meaning of ``target_modules`` in this package.

    - ``None``: the layers inside the repeated blocks (:func:`block_modules`), never the output head; a model
      whose blocks hold no such layer falls back to ``"all-linear"``. The default of functions that convert
      layers (``quantize_model``, ``materialize_llama``).
    - ``"all-linear"``: every layer except the output head and the weights tied to it or to an input embedding
      (:func:`output_layer_names`), as PEFT means it.
    - any other string: a regular expression that must match the whole qualified module name (``re.fullmatch``,
      as PEFT does), e.g. ``r"model\\.layers\\.\\d+\\.mlp\\..*"``.
    - a list (or tuple) of strings: a module is selected when its qualified name equals an entry or ends with
      ``"." + entry`` (PEFT's rule): ``["q_proj", "v_proj"]``, ``["layers.0.mlp.up_proj"]``.

    A regular expression or a list selects exactly what it names, the output head included; only ``None`` and
    ``"all-linear"`` leave the head out. Only ``candidate`` layers are ever selected.

    Args:
        model: any module tree (meta-device models included).
        target_modules: see above.
        candidate: which modules are layers: :func:`is_linear` (registered linear types; param groups) or
            :func:`is_dense_linear` (plain ``nn.Linear``; layer conversions).
        match_name: maps a qualified name to the name a regular expression or a list is matched against (the PEFT
            glue passes the name a layer has in the wrapped base model); default: the qualified name itself.

    Returns:
        Ordered mapping from qualified module name to layer; empty when nothing matches.

    Raises:
        ValueError: for a ``target_modules`` of another type, or an invalid regular expression.
    """
    _check_target_modules(target_modules)
    if target_modules is None:
        found = block_modules(model, candidate)
        if found:
            return found
        target_modules = ALL_LINEAR
    named = {name: module for name, module in model.named_modules() if name and candidate(module)}
    if target_modules == ALL_LINEAR:
        head = output_layer_names(model, candidate)
        return {name: module for name, module in named.items() if name not in head}
    rename = match_name or (lambda name: name)
    return {name: module for name, module in named.items() if matches_target(rename(name), target_modules)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Puts ``module`` at the qualified ``name`` inside ``model`` and returns the module it replaced.

    Args:
        model: the root module.
        name: dotted path of an existing submodule (``"model.layers.0.mlp.up_proj"``; list entries by index).
        module: the new submodule.

    Returns:
        The previous submodule at ``name``.

    Raises:
        ValueError: for an empty ``name`` (the root cannot replace itself) or a path that names no submodule.
    """
    if not name:
        raise ValueError("replace_module needs the dotted name of a submodule; the root module cannot be replaced")
    parent_name, _, child_name = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError as error:
        raise ValueError(f"{type(model).__name__} has no submodule {parent_name!r} (replacing {name!r})") from error
    children = dict(parent.named_children())
    if child_name not in children:
        raise ValueError(f"{type(model).__name__} has no submodule {name!r}")
    setattr(parent, child_name, module)
    return children[child_name]
