"""The training loop behind ``lowrank-train pretrain`` and ``finetune``, and the WeLore ``compress`` step.

It only composes the library: models (:mod:`lowrank_train.train.model`), data (:mod:`lowrank_train.data`),
optimizers (:mod:`lowrank_train.optim`), INT8 weights (:mod:`lowrank_train.nn`), WeLore
(:mod:`lowrank_train.welore`). A run writes into ``run.output_dir``: ``config.yaml``, ``metrics.jsonl``,
``checkpoints/`` and ``summary.json``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from lowrank_train.nn.chunked_loss import causal_lm_loss
from lowrank_train.train.checkpoint import (
    checkpoint_root,
    latest_checkpoint,
    load_state,
    read_meta,
    save_checkpoint,
)
from lowrank_train.train.config import (
    ConfigError,
    OptimizerConfig,
    TrainConfig,
    config_differences,
    config_fingerprint,
)
from lowrank_train.train.estimate import memory_fit_problem
from lowrank_train.train.metrics import MetricsWriter, format_bytes, peak_memory_bytes
from lowrank_train.train.model import build_model, count_parameters
from lowrank_train.train.report import memory_table, optimizer_state_bytes
from lowrank_train.train.schedule import lr_factor, set_learning_rate

logger = logging.getLogger(__name__)

Log = Callable[[str], None]
SUMMARY_FILE = "summary.json"
MODES = ("pretrain", "finetune")


class ResumeError(ValueError):
    """A resume that cannot continue the same run (no checkpoint, or one written with a different config)."""


# ------------------------------------------------------------------------------------------------
# pieces


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but torch sees no CUDA device; use run.device=cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` -> the torch dtype."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_run_tokenizer(name: str, model_tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``data.tokenizer``; ``model`` means the one that came with the pretrained model."""
    if name == "model":
        if model_tokenizer is None:
            raise ConfigError(
                "data.tokenizer is 'model' but the model came without a tokenizer (built from shapes, or its folder "
                "has none): name one, e.g. data.tokenizer=gpt2-offline"
            )
        return model_tokenizer
    from lowrank_train.data import load_tokenizer

    return load_tokenizer(name)


def load_run_data(config: TrainConfig, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Any:
    """Tokenize, pack and cache ``data.corpus``; check that its token ids fit the model's embedding.

    Returns:
        a :class:`lowrank_train.data.PackedCorpus` (``train`` and ``heldout`` blocks of ``data.seq_len``).
    """
    from lowrank_train.data import build_packed_corpus, check_vocab_fits

    data = config.data
    packed = build_packed_corpus(
        data.corpus,
        tokenizer,
        data.seq_len,
        heldout_fraction=data.heldout_fraction,
        hub_config=data.hub_config,
        split=data.split,
        text_field=data.text_field,
        max_documents=data.max_documents,
        cache_dir=data.cache_dir,
    )
    check_vocab_fits(packed.max_token_id, vocab_size, tokenizer_name=data.tokenizer)
    if packed.train.shape[0] < data.batch_size:
        raise ConfigError(
            f"data.batch_size ({data.batch_size}) exceeds the {packed.train.shape[0]} training sequences of "
            f"{data.seq_len} tokens in {data.corpus!r}: lower data.batch_size or data.seq_len"
        )
    return packed


def prepare_model(model: nn.Module, config: TrainConfig, device: torch.device) -> nn.Module:
    """INT8 weights (``optimizer.weight_bits``), activation checkpointing, then move to ``device``."""
    bits = config.optimizer.resolved_weight_bits
    if bits is not None:
        from lowrank_train.nn import QuantLinear, quantize_model

        if not any(isinstance(m, QuantLinear) for m in model.modules()):  # built quantized from shapes already
            quantize_model(model, bits=bits, group_size=config.optimizer.weight_group_size)
    if config.run.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError(f"run.activation_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.train()
    return model


def pretrain_param_groups(model: nn.Module, config: OptimizerConfig) -> list[dict[str, Any]]:
    """GaLore-style groups (projected linear weights + the rest) for the GaLore family, else one named group."""
    if config.is_galore:
        from lowrank_train.optim import lowrank_param_groups

        return lowrank_param_groups(
            model,
            rank=config.rank,
            update_gap=config.update_gap,
            scale=config.scale,
            projector=config.projector,
            target_modules=list(config.target_modules)
            if isinstance(config.target_modules, tuple)
            else config.target_modules,
            proj_bits=config.resolved_proj_bits,
            adaptive_refresh=config.resolved_adaptive_refresh,
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]


def optimizer_factory(config: OptimizerConfig) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """A function from param groups to the optimizer named by ``config.name`` (its registry entry's builder)."""
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay, "betas": config.betas, "eps": config.eps}
    build = config.method.build
    return lambda groups: build(groups, **kwargs)


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over ``groups``; with ``optimizer.layerwise`` a :class:`LayerwiseOptimizer` around it."""
    factory = optimizer_factory(config.optimizer)
    if not config.optimizer.layerwise:
        return factory(groups)
    try:
        from lowrank_train.optim.layerwise import LayerwiseOptimizer
    except ImportError as error:
        raise ConfigError(
            f"optimizer.layerwise needs lowrank_train.optim.layerwise, which cannot be imported here: {error}"
        ) from error
    max_norm = config.optimizer.max_grad_norm or None
    return LayerwiseOptimizer(groups, factory, accumulation_steps=config.data.grad_accum, max_grad_norm=max_norm)


@torch.no_grad()
def evaluate(model: nn.Module, blocks: torch.Tensor, batch_size: int, max_batches: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over held-out blocks.

    Args:
        model: a causal LM returning ``.loss`` when given ``labels``.
        blocks: ``(M, seq_len)`` token ids.
        batch_size: blocks per forward pass.
        max_batches: stop after this many batches (0: all).
        device: where the model lives.

    Returns:
        The loss averaged over every predicted token (each block predicts ``seq_len - 1`` tokens).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, start in enumerate(range(0, blocks.shape[0], batch_size)):
        if max_batches and index >= max_batches:
            break
        batch = blocks[start : start + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * tokens
        count += tokens
    model.train(was_training)
    if count == 0:
        raise ValueError("the held-out split is empty: raise data.heldout_fraction")
    return total / count


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite past overflow."""
    return math.exp(loss) if loss < 700 else math.inf


# ------------------------------------------------------------------------------------------------
# the loop


def _prepare_output_dir(config: TrainConfig, resume: bool) -> tuple[Path, Path | None]:
    output = Path(config.run.output_dir)
    if resume:
        folder = latest_checkpoint(output)
        if folder is None:
            raise ResumeError(
                f"--resume: {output} holds no checkpoint to resume from (looked in {checkpoint_root(output)})"
            )
        meta = read_meta(folder)
        differences = config_differences(meta["config"], config.to_dict())
        if differences:
            listed = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in differences.items())
            raise ResumeError(
                f"--resume: the checkpoint in {folder} was written by a different config ({listed}). Resume with the "
                "same config, or start a new run in another run.output_dir"
            )
        return output, folder
    if latest_checkpoint(output) is not None:
        if not config.run.overwrite:
            raise ResumeError(
                f"{output} already holds checkpoints: pass --resume to continue that run, run.overwrite=true to "
                "start again from scratch (deleting them), or choose another run.output_dir"
            )
        shutil.rmtree(checkpoint_root(output))
    return output, None


def _capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(
    config: TrainConfig,
    *,
    mode: str = "pretrain",
    resume: bool = False,
    log: Log = logger.info,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training run to ``run.max_steps`` and return its summary.

    Args:
        config: the validated run config.
        mode: ``pretrain`` (all parameters; GaLore groups for the GaLore family) or ``finetune`` (a WeLore
            model from ``model.pretrained``; ``finetune.trainable`` picks what trains).
        resume: continue from the newest checkpoint in ``run.output_dir`` (same config required).
        log: receives the progress lines and the closing summary.
        stop_after: stop after this many steps as if the process had been killed (checkpoints only as
            scheduled by ``run.save_every``); for tests of ``resume``.

    Returns:
        The summary (also written to ``summary.json``): final eval loss and perplexity, tokens/s, peak memory,
        parameter counts, optimizer-state bytes and the memory table against AdamW.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    run = config.run
    device = resolve_device(run.device)
    dtype = resolve_dtype(run.dtype)
    if run.num_threads is not None:
        torch.set_num_threads(run.num_threads)
    if run.check_memory:
        problem = memory_fit_problem(config, device)
        if problem:
            raise MemoryError(f"{problem} (set run.check_memory=false to try anyway)")
    output, resume_from = _prepare_output_dir(config, resume)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")

    torch.manual_seed(run.seed)
    model, model_tokenizer = build_model(
        config.model,
        dtype,
        weight_bits=config.optimizer.resolved_weight_bits if mode == "pretrain" else None,
        weight_group_size=config.optimizer.weight_group_size,
        seed=run.seed,
    )
    tokenizer = load_run_tokenizer(config.data.tokenizer, model_tokenizer)
    packed = load_run_data(config, tokenizer, model.get_input_embeddings().num_embeddings)
    model = prepare_model(model, config, device)

    if mode == "finetune":
        groups = _finetune_groups(model, config)
    else:
        groups = pretrain_param_groups(model, config.optimizer)
    optimizer = build_optimizer(groups, config)
    trainable = [p for g in groups for p in g["params"]]
    layerwise = config.optimizer.layerwise

    start_step, tokens_done, train_seconds = 0, 0, 0.0
    if resume_from is not None:
        state = load_state(resume_from, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"], device)
        start_step = int(state["step"])
        tokens_done = int(state["tokens"])
        train_seconds = float(state["train_seconds"])
        log(f"resumed from {resume_from} at step {start_step}")

    from lowrank_train.data import iterate_batches

    data = config.data
    tokens_per_step = data.batch_size * data.seq_len * data.grad_accum
    batches: Iterator[torch.Tensor] = iterate_batches(
        packed.train, data.batch_size, seed=run.seed, start_step=start_step * data.grad_accum
    )
    metrics = MetricsWriter(
        output,
        run.metrics,
        resume_step=start_step if resume_from is not None else None,
        run_name=output.name,
        config=config.to_dict(),
    )
    num_params = count_parameters(model)
    num_trainable = sum(p.numel() for p in trainable)
    log(
        f"{mode}: {type(model).__name__} with {num_params / 1e6:.2f}M parameters ({num_trainable / 1e6:.2f}M "
        f"trainable), optimizer {config.optimizer.name}{' (layer-wise)' if layerwise else ''}, {run.dtype} on "
        f"{device}; {packed.train.shape[0]} training sequences of {data.seq_len} tokens from {data.corpus!r}, "
        f"{tokens_per_step} tokens per step"
    )

    def run_eval(step: int) -> float:
        loss = evaluate(model, packed.heldout, data.batch_size, run.eval_batches, device)
        metrics.write({"split": "eval", "step": step, "loss": loss, "perplexity": perplexity(loss)})
        log(f"eval step {step}: loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        return loss

    def checkpoint(step: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": _capture_rng(device),
            "step": torch.tensor(step),
            "tokens": torch.tensor(tokens_done),
            "train_seconds": torch.tensor(train_seconds, dtype=torch.float64),
        }
        meta = {"step": step, "mode": mode, "fingerprint": config_fingerprint(config), "config": config.to_dict()}
        save_checkpoint(output, step, state, meta, keep=run.keep_checkpoints)

    eval_loss = run_eval(0) if resume_from is None else None
    window_loss, window_steps, window_seconds = 0.0, 0, 0.0
    last_step = start_step
    for step in range(start_step, run.max_steps):
        if stop_after is not None and step >= stop_after:
            metrics.close()
            return {"stopped_at": step}
        set_learning_rate(
            optimizer,
            lr_factor(
                step,
                max_steps=run.max_steps,
                warmup_steps=config.schedule.warmup_steps,
                min_lr_ratio=config.schedule.min_lr_ratio,
                kind=config.schedule.kind,
            ),
        )
        started = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for _ in range(data.grad_accum):
            batch = next(batches).to(device)
            if run.loss_chunk_size:
                loss = causal_lm_loss(model, batch, chunk_size=run.loss_chunk_size)
            else:
                loss = model(input_ids=batch, labels=batch).loss
            (loss / data.grad_accum).backward()
            step_loss += loss.detach().float() / data.grad_accum
        if not layerwise:
            if config.optimizer.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_value = float(step_loss)
        elapsed = time.perf_counter() - started
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"the training loss became {loss_value} at step {step + 1}; lower optimizer.lr or add warm-up "
                "(schedule.warmup_steps)"
            )
        tokens_done += tokens_per_step
        train_seconds += elapsed
        window_loss += loss_value
        window_steps += 1
        window_seconds += elapsed
        done = step + 1
        last_step = done
        if done % run.log_every == 0 or done == run.max_steps:
            lr = optimizer.param_groups[0]["lr"]
            tokens_per_second = window_steps * tokens_per_step / max(window_seconds, 1e-9)
            peak = peak_memory_bytes(device)
            record = {
                "split": "train",
                "step": done,
                "loss": window_loss / window_steps,
                "lr": lr,
                "tokens_per_s": tokens_per_second,
                "tokens": tokens_done,
                "peak_memory_bytes": peak,
            }
            metrics.write(record)
            log(
                f"step {done}/{run.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                f"{tokens_per_second:,.0f} tok/s | peak mem {format_bytes(peak)}"
            )
            window_loss, window_steps, window_seconds = 0.0, 0, 0.0
        if run.eval_every and done % run.eval_every == 0 and done != run.max_steps:
            eval_loss = run_eval(done)
        if run.save_every and done % run.save_every == 0 and done != run.max_steps:
            checkpoint(done)

    if eval_loss is None or last_step != 0:
        eval_loss = run_eval(last_step)
    if run.save_final:
        checkpoint(last_step)
    if mode == "finetune":
        _save_finetuned(model, tokenizer, output / "model")
    table = memory_table(model, optimizer, config.optimizer.name, dtype)
    summary = {
        "mode": mode,
        "steps": last_step,
        "final_eval_loss": eval_loss,
        "final_eval_perplexity": perplexity(eval_loss),
        "tokens": tokens_done,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_done / train_seconds if train_seconds else 0.0,
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "parameters": num_params,
        "trainable_parameters": num_trainable,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "memory_table": table.to_dict(),
        "device": str(device),
    }
    metrics.close()
    _write_json(output / SUMMARY_FILE, summary)
    log(render_summary(summary))
    if run.memory_table:
        log("optimizer memory, measured after the last step, next to AdamW on the same model:\n" + table.render())
    return summary


def render_summary(summary: dict[str, Any]) -> str:
    """The closing lines of a run."""
    return (
        f"done: {summary['steps']} steps, final eval loss {summary['final_eval_loss']:.4f} "
        f"(perplexity {summary['final_eval_perplexity']:.2f}), {summary['tokens_per_s']:,.0f} tokens/s, "
        f"peak memory {format_bytes(summary['peak_memory_bytes'])} ({summary['peak_memory_kind']})"
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _finetune_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    from lowrank_train.welore import mark_trainable

    opt = config.optimizer
    options = {"update_gap": opt.update_gap, "scale": opt.scale, "projector": opt.projector}
    if opt.resolved_proj_bits is not None:
        options["proj_bits"] = opt.resolved_proj_bits
    options["adaptive_refresh"] = opt.resolved_adaptive_refresh
    try:
        return mark_trainable(model, config.finetune.trainable, galore_rank=opt.rank, galore_options=options)
    except ValueError as error:
        raise ConfigError(
            f"finetune: {error}. model.pretrained must be a folder written by `lowrank-train compress`"
        ) from error


def _save_finetuned(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    from lowrank_train.welore import save_compressed

    save_compressed(model, folder)
    tokenizer.save_pretrained(folder)


# ------------------------------------------------------------------------------------------------
# WeLore compression


def compress(config: TrainConfig, *, log: Log = logger.info) -> dict[str, Any]:
    """Compress ``model.pretrained`` with WeLore, measure held-out perplexity before and after, save the result.

    The compressed model (with its tokenizer) goes to ``<run.output_dir>/model``, ready for
    ``lowrank-train finetune`` with ``model.pretrained`` pointing there.

    Returns:
        The summary (also in ``summary.json``): perplexity before/after, parameters before/after, ranks.
    """
    from lowrank_train.welore import WeLoreConfig, compress_model, save_compressed

    if config.model.pretrained is None:
        raise ConfigError("compress needs model.pretrained (a model folder, hub id or smollm2-offline)")
    spec = config.compress
    welore_config = WeLoreConfig(
        target=spec.target,
        strategy=spec.strategy,
        min_ratio=spec.min_ratio,
        damping=spec.damping,
        asvd_alpha=spec.asvd_alpha,
        num_threads=spec.num_threads,
    )
    device = resolve_device(config.run.device)
    if config.run.num_threads is not None:
        torch.set_num_threads(config.run.num_threads)
    output = Path(config.run.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.run.seed)
    model, model_tokenizer = build_model(config.model, resolve_dtype(config.run.dtype))
    tokenizer = load_run_tokenizer(config.data.tokenizer, model_tokenizer)
    packed = load_run_data(config, tokenizer, model.get_input_embeddings().num_embeddings)
    model.to(device)
    batch, eval_batches = config.data.batch_size, config.run.eval_batches
    params_before = count_parameters(model)
    loss_before = evaluate(model, packed.heldout, batch, eval_batches, device)
    log(f"before: eval loss {loss_before:.4f}, perplexity {perplexity(loss_before):.2f}, {params_before:,} parameters")
    calibration = packed.train[: spec.calibration_sequences].to(device)
    report = compress_model(model, welore_config, calibration=calibration)
    log(report.summary())
    params_after = count_parameters(model)
    loss_after = evaluate(model, packed.heldout, batch, eval_batches, device)
    log(f"after: eval loss {loss_after:.4f}, perplexity {perplexity(loss_after):.2f}, {params_after:,} parameters")
    folder = output / "model"
    save_compressed(model, folder)
    tokenizer.save_pretrained(folder)
    summary = {
        "mode": "compress",
        "eval_loss_before": loss_before,
        "perplexity_before": perplexity(loss_before),
        "eval_loss_after": loss_after,
        "perplexity_after": perplexity(loss_after),
        "parameters_before": params_before,
        "parameters_after": params_after,
        "report": report.to_dict(),
        "model_dir": str(folder),
    }
    _write_json(output / SUMMARY_FILE, summary)
    log(f"compressed model saved to {folder}")
    return summary
