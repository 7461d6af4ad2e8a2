"""Saving, loading and merging compressed models.

A compressed checkpoint is a folder with ``model.safetensors`` (the full state dict, shared tensors such as tied
embeddings stored once), ``welore.json`` (which modules are low-rank, with their ranks and shapes) and, for
Hugging Face models, ``config.json``. Loading rebuilds the skeleton and loads tensors; no SVD is run.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from lowrank_train.folders import write_folder
from lowrank_train.nn.lowrank_linear import LowRankLinear
from lowrank_train.nn.surgery import replace_module

__all__ = [
    "export_dense",
    "load_compressed",
    "lowrank_layers",
    "merge_lowrank",
    "save_compressed",
    "write_compressed_files",
]

FORMAT = "lowrank_train.welore/1"
WEIGHTS_NAME = "model.safetensors"
RANKS_NAME = "welore.json"


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """All :class:`LowRankLinear` modules by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def save_compressed(
    model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Write a compressed model to the folder ``path``, whole or not at all (``lowrank_train.folders.write_folder``).

    Args:
        model: a model holding :class:`LowRankLinear` layers (e.g. after ``compress_model``).
        path: output folder; its parent is created if needed.
        tokenizer: saved next to the weights with ``save_pretrained`` (``None``: weights only).
        overwrite: replace an existing, non-empty ``path`` (an empty folder is always replaced).

    Returns:
        The folder written.

    Raises:
        FolderExistsError: ``path`` holds files and ``overwrite`` is False.
    """
    with write_folder(path, overwrite=overwrite) as staging:
        write_compressed_files(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(path)


def write_compressed_files(model: nn.Module, folder: str | os.PathLike) -> None:
    """The files of a compressed model, written straight into ``folder`` (a staging folder of the writer).

    Args:
        model: a model holding :class:`LowRankLinear` layers.
        folder: an existing folder; files of the same names are overwritten.
    """
    layers = lowrank_layers(model)
    first = next(model.parameters())
    description: dict[str, Any] = {
        "format": FORMAT,
        "dtype": str(first.dtype).removeprefix("torch."),
        "layers": {
            name: {
                "rank": layer.rank,
                "shape": [layer.out_features, layer.in_features],
                "bias": layer.bias is not None,
            }
            for name, layer in layers.items()
        },
    }
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(folder)
    save_model(model, os.path.join(folder, WEIGHTS_NAME))
    with open(os.path.join(folder, RANKS_NAME), "w") as handle:
        json.dump(description, handle, indent=1)


def _validate_tensors(weights_file: str, layers: dict[str, dict[str, Any]]) -> None:
    with safe_open(weights_file, framework="pt") as handle:
        shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    problems = []
    for name, spec in layers.items():
        rank = spec["rank"]
        out_features, in_features = spec["shape"]
        expected = {f"{name}.factor_out": [out_features, rank], f"{name}.factor_in": [rank, in_features]}
        for key, shape in expected.items():
            if key not in shapes:
                problems.append(f"{key} is missing")
            elif shapes[key] != shape:
                problems.append(f"{key} has shape {shapes[key]}, but rank {rank} needs {shape}")
    listed = {f"{name}.{part}" for name in layers for part in ("factor_out", "factor_in")}
    unlisted = sorted(key for key in shapes if key.endswith((".factor_out", ".factor_in")) and key not in listed)
    problems += [f"{key} is not described in {RANKS_NAME}" for key in unlisted]
    if problems:
        raise ValueError(
            f"compressed checkpoint: ranks in {RANKS_NAME} do not match the tensors: " + "; ".join(problems)
        )


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`, without any SVD.

    Args:
        path: the checkpoint folder.
        model: optional dense skeleton with the original architecture; by default it is built from the folder's
            Hugging Face ``config.json`` with ``AutoModelForCausalLM.from_config``.

    Returns:
        The model with :class:`LowRankLinear` layers and the saved weights, in eval mode.

    Raises:
        ValueError: if the folder is not a WeLore checkpoint, its ranks do not match the tensors, or a listed
            module does not exist as a linear of that shape in the skeleton.
    """
    ranks_file = os.path.join(path, RANKS_NAME)
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(ranks_file) or not os.path.exists(weights_file):
        raise ValueError(f"{path} is not a compressed checkpoint (needs {RANKS_NAME} and {WEIGHTS_NAME})")
    with open(ranks_file) as handle:
        description = json.load(handle)
    if description.get("format") != FORMAT:
        raise ValueError(f"{ranks_file}: unknown format {description.get('format')!r}, expected {FORMAT!r}")
    layers: dict[str, dict[str, Any]] = description["layers"]
    _validate_tensors(weights_file, layers)

    dtype = getattr(torch, description["dtype"])
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM  # optional dependency, needed only here

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model = model.to(dtype)
    for name, spec in layers.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"module {name!r} from {RANKS_NAME} does not exist in the model") from error
        out_features, in_features = spec["shape"]
        if not isinstance(dense, nn.Linear | LowRankLinear) or (dense.out_features, dense.in_features) != (
            out_features,
            in_features,
        ):
            raise ValueError(f"module {name!r} is not a ({out_features}, {in_features}) linear in the model")
        device = next(dense.parameters()).device
        replace_module(
            model,
            name,
            LowRankLinear(in_features, out_features, spec["rank"], spec["bias"], device=device, dtype=dtype),
        )
    load_model(model, weights_file, strict=True)
    return model.eval()


def merge_lowrank(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every :class:`LowRankLinear` by its dense ``merge()``.

    Args:
        model: a compressed model.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The dense model (the copy unless ``inplace``).
    """
    target = model if inplace else copy.deepcopy(model)
    for name, layer in lowrank_layers(target).items():
        replace_module(target, name, layer.merge())
    return target


def export_dense(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a dense copy of a compressed Hugging Face model in the ``save_pretrained`` layout, for serving.

    Args:
        model: a compressed model with a ``save_pretrained`` method (left unchanged).
        path: output folder, written whole or not at all.
        overwrite: replace an existing, non-empty ``path``.

    Returns:
        The folder written.
    """
    if not hasattr(model, "save_pretrained"):
        raise ValueError("export_dense needs a Hugging Face model (with save_pretrained); use merge_lowrank instead")
    with write_folder(path, overwrite=overwrite) as staging:
        merge_lowrank(model).save_pretrained(staging)
    return Path(path)
