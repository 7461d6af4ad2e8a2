"""The training loop behind ``lowrank-train pretrain`` and ``finetune``.

It only composes: the run's pieces come from :mod:`lowrank_train.train.setup` (device, data, model, optimizer
from the optimizer registry), the run folder and resume policy from :mod:`lowrank_train.train.run_dir`, held-out
evaluation from :mod:`lowrank_train.train.evaluation`. WeLore's ``compress`` command is
:mod:`lowrank_train.train.compress_run`.

A run holds its folder's lock for its whole life, stops with a checkpoint on SIGTERM / SIGINT
(:mod:`lowrank_train.train.signals`) and follows one non-finite policy (``optimizer.nonfinite``): ``raise`` stops
at the first NaN/Inf; ``skip`` skips the step in the loop and in the optimizer alike and counts it
(:class:`SkippedSteps`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowrank_train.nn.chunked_loss import causal_lm_loss
from lowrank_train.train.checkpoint import read_meta
from lowrank_train.train.config import TrainConfig
from lowrank_train.train.estimate import memory_fit_problem
from lowrank_train.train.evaluation import evaluate, perplexity
from lowrank_train.train.export import MODEL_FOLDER, save_run_model
from lowrank_train.train.metrics import MetricsWriter, format_bytes, peak_memory_bytes, read_metrics
from lowrank_train.train.model import build_model, count_parameters
from lowrank_train.train.plot import plot_run_if_possible
from lowrank_train.train.progress import RunProgress, StepStats
from lowrank_train.train.report import memory_table, optimizer_state_bytes
from lowrank_train.train.run_dir import (
    CONFIG_FILE,
    SUMMARY_FILE,
    ResumeError,
    checkpoint_state,
    prepare_output_dir,
    restore_checkpoint,
    run_folder_lock,
    save_run_checkpoint,
    write_json,
)
from lowrank_train.train.schedule import extend_schedule, schedule_segment, segment_lr_factor, set_learning_rate
from lowrank_train.train.setup import (
    build_optimizer,
    finetune_param_groups,
    load_run_tokenizer,
    open_run_data,
    prepare_model,
    pretrain_param_groups,
    resolve_device,
    resolve_dtype,
)
from lowrank_train.train.signals import RunInterrupted, StopRequest, stop_on_signals

logger = logging.getLogger(__name__)

Log = Callable[[str], None]
MODES = ("pretrain", "finetune")


@dataclass
class SkippedSteps:
    """Steps skipped under ``optimizer.nonfinite: skip``, and the bounds that stop a run that keeps skipping.

    A step is skipped when its loss is NaN/Inf (the loop does no backward and no update) or when the optimizer
    skipped it for a NaN/Inf gradient (its own ``skipped_steps`` grew).
    """

    max_total: int
    max_consecutive: int
    total: int = 0
    consecutive: int = 0

    def record(self, step: int, skipped: bool, loss: float, log: Log) -> None:
        """Counts step ``step`` (1-based) and says so when it was skipped.

        Raises:
            FloatingPointError: more skipped steps than ``optimizer.max_skipped_steps`` in all, or than
                ``optimizer.max_consecutive_skips`` in a row.
        """
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        cause = f"the loss was {loss}" if not math.isfinite(loss) else "a gradient held NaN/Inf"
        log(f"step {step} skipped ({cause}; no update applied): {self.total} skipped so far")
        for count, bound, key in (
            (self.total, self.max_total, "max_skipped_steps"),
            (self.consecutive, self.max_consecutive, "max_consecutive_skips"),
        ):
            if count > bound:
                raise FloatingPointError(
                    f"stopped at step {step}: {self.total} steps skipped ({self.consecutive} in a row) for non-finite "
                    f"values, more than optimizer.{key}={bound}. Lower optimizer.lr or add warm-up "
                    "(schedule.warmup_steps), then --resume from the last checkpoint"
                )


def train(
    config: TrainConfig,
    *,
    mode: str = "pretrain",
    resume: bool = False,
    log: Log = logger.info,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a training run to ``run.max_steps`` and return its summary.

    The run holds the run folder's lock (:func:`~lowrank_train.train.run_dir.run_folder_lock`) throughout, and
    SIGTERM / SIGINT stop it after the current step with a checkpoint (:mod:`lowrank_train.train.signals`).

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
        parameter counts, optimizer-state bytes, skipped steps and the memory table against AdamW.

    Raises:
        RunInterrupted: SIGTERM or SIGINT (a ``SystemExit`` with status 143 / 130) after the checkpoint was written.
        FloatingPointError: a non-finite loss under ``optimizer.nonfinite: raise``, or more skipped steps than the
            bounds allow under ``skip``.
        RunLockedError: another process is using ``run.output_dir``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    with run_folder_lock(Path(config.run.output_dir)), stop_on_signals() as stop:
        return _train(config, mode=mode, resume=resume, log=log, stop_after=stop_after, stop=stop)


def _train(
    config: TrainConfig, *, mode: str, resume: bool, log: Log, stop_after: int | None, stop: StopRequest
) -> dict[str, Any]:
    """:func:`train` inside the run lock, with ``stop`` set by the signal handlers."""
    run = config.run
    device = resolve_device(run.device)
    dtype = resolve_dtype(run.dtype)
    if run.num_threads is not None:
        torch.set_num_threads(run.num_threads)
    if run.check_memory:
        problem = memory_fit_problem(config, device)
        if problem:
            raise MemoryError(f"{problem} (set run.check_memory=false to try anyway)")
    output, resume_from = prepare_output_dir(config, resume, log=log)
    saved_meta = read_meta(resume_from) if resume_from is not None else {}
    if resume_from is not None and int(saved_meta["step"]) >= run.max_steps and (output / SUMMARY_FILE).is_file():
        # Issue 15 item 4: a finished run resumed with the same max_steps changes nothing and appends nothing.
        log(
            f"the run in {output} is already complete at step {saved_meta['step']} (run.max_steps={run.max_steps}); "
            "nothing to do. Pass a larger run.max_steps to continue it"
        )
        return json.loads((output / SUMMARY_FILE).read_text(encoding="utf-8"))
    log(f"run folder: {output.resolve()}")

    def mixed_precision() -> contextlib.AbstractContextManager:
        # Forward passes only: backward follows the dtypes autocast chose, and the optimizer sees run.dtype.
        if run.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, run.autocast))

    torch.manual_seed(run.seed)
    model, model_tokenizer = build_model(
        config.model,
        dtype,
        weight_bits=config.optimizer.resolved_weight_bits if mode == "pretrain" else None,
        weight_group_size=config.optimizer.weight_group_size,
        seed=run.seed,
    )
    tokenizer = load_run_tokenizer(config.data.tokenizer, model_tokenizer)
    training_data = open_run_data(config, tokenizer, model.get_input_embeddings().num_embeddings)
    if resume_from is not None and saved_meta.get("data_fingerprint", training_data.fingerprint) != (
        training_data.fingerprint
    ):
        if not run.allow_data_change:
            raise ResumeError(
                f"--resume: the data changed since the checkpoint in {resume_from} (the text of data.corpus="
                f"{config.data.corpus!r}, the tokenizer or data.seq_len: fingerprint "
                f"{saved_meta['data_fingerprint'][:12]}, now {training_data.fingerprint[:12]}). Restore the data, "
                "or pass run.allow_data_change=true to continue on the new data"
            )
        log("resume: the data changed since the checkpoint; continuing on the new data (run.allow_data_change)")
    model = prepare_model(model, config, device)

    if mode == "finetune":
        groups = finetune_param_groups(model, config)
    else:
        groups = pretrain_param_groups(model, config.optimizer)
    optimizer = build_optimizer(groups, config)
    trainable = [p for g in groups for p in g["params"]]
    layerwise = config.optimizer.layerwise

    data = config.data
    start_step, tokens_done, train_seconds = 0, 0, 0.0
    # The train loss of every step: logging windows are cut at multiples of run.log_every from these, so a resumed
    # run logs what the uninterrupted run logs whatever log_every either used (issue 12 item 6).
    step_losses: list[float] = []
    skips = SkippedSteps(config.optimizer.max_skipped_steps, config.optimizer.max_consecutive_skips)
    schedule = schedule_segment(run.max_steps)
    batches = training_data.train_batches()
    if resume_from is not None:
        point = restore_checkpoint(resume_from, model, optimizer, device)
        start_step, tokens_done, train_seconds = point.step, point.tokens, point.train_seconds
        # Checkpoints written before the losses were stored: unknown steps are NaN, left out of their window.
        step_losses = (point.step_losses + [math.nan] * start_step)[:start_step]
        if point.data is not None and saved_meta.get("data_fingerprint") == training_data.fingerprint:
            batches.load_state_dict(point.data)
        else:  # older checkpoints, or new data (run.allow_data_change): the same position, counted in batches
            batches = training_data.train_batches(start_step * data.grad_accum)
        saved_max = int(saved_meta["config"]["run"]["max_steps"])
        schedule = point.schedule or schedule_segment(saved_max)
        skips.total, skips.consecutive = point.skipped_steps, point.consecutive_skips
        rescale_peak_lr(optimizer, float(saved_meta["config"]["optimizer"]["lr"]), config.optimizer.lr)
        log(f"resumed from {resume_from} at step {start_step}")
        schedule = resumed_schedule(schedule, config, step=start_step, saved_max=saved_max, log=log)

    tokens_per_step = data.batch_size * data.seq_len * data.grad_accum
    metrics = MetricsWriter(
        output,
        run.metrics,
        resume_step=start_step if resume_from is not None else None,
        log=log,
        run_name=output.name,
        config=config.to_dict(),
    )
    num_params = count_parameters(model)
    num_trainable = sum(p.numel() for p in trainable)
    log(
        f"{mode}: {type(model).__name__} with {num_params / 1e6:.2f}M parameters ({num_trainable / 1e6:.2f}M "
        f"trainable), optimizer {config.optimizer.name}{' (layer-wise)' if layerwise else ''}, {run.dtype} on "
        f"{device}; {training_data.describe()}, {tokens_per_step} tokens per step"
    )

    def run_eval(step: int) -> float:
        with mixed_precision():
            loss = evaluate(model, training_data.heldout, data.batch_size, run.eval_batches, device)
        metrics.write({"split": "eval", "step": step, "loss": loss, "perplexity": perplexity(loss)})
        log(f"eval step {step}: loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        return loss

    saved: dict[int, Path] = {} if resume_from is None else {start_step: resume_from}

    def checkpoint(step: int) -> Path:
        state = checkpoint_state(
            model,
            optimizer,
            device,
            step=step,
            tokens=tokens_done,
            train_seconds=train_seconds,
            data=batches.state_dict(),
            step_losses=step_losses,
            schedule=schedule,
            skipped_steps=skips.total,
            consecutive_skips=skips.consecutive,
        )
        saved[step] = save_run_checkpoint(output, config, mode, state, data_fingerprint=training_data.fingerprint)
        return saved[step]

    eval_loss = run_eval(0) if resume_from is None else None
    window_steps, window_seconds = 0, 0.0
    last_step = start_step
    # A bar in a terminal, plain lines elsewhere; messages while the bar is drawn go above it.
    progress = RunProgress(total=run.max_steps, start=start_step, log=log)
    log = progress.wrap(log)
    for step in range(start_step, run.max_steps):
        if stop_after is not None and step >= stop_after:
            progress.close()
            metrics.close()
            return {"stopped_at": step}
        if stop.signum is not None:
            progress.close()
            metrics.close()
            # a signal during a scheduled save (or before the first step of a resume): that checkpoint is the one
            raise _interrupted(stop, saved.get(step) or checkpoint(step), step, output, mode, log)
        set_learning_rate(
            optimizer,
            segment_lr_factor(
                step,
                segment=schedule,
                warmup_steps=config.schedule.warmup_steps,
                min_lr_ratio=config.schedule.min_lr_ratio,
                kind=config.schedule.kind,
            ),
        )
        started = time.perf_counter()
        loss_value, skipped = optimizer_step(
            model, optimizer, batches, config, device, mixed_precision=mixed_precision, trainable=trainable
        )
        elapsed = time.perf_counter() - started
        if not math.isfinite(loss_value) and config.optimizer.nonfinite == "raise":
            raise FloatingPointError(
                f"the training loss became {loss_value} at step {step + 1}; lower optimizer.lr or add warm-up "
                "(schedule.warmup_steps), or set optimizer.nonfinite=skip to skip such steps"
            )
        skips.record(step + 1, skipped, loss_value, log)
        tokens_done += tokens_per_step  # a skipped step consumed its batches too
        train_seconds += elapsed
        step_losses.append(loss_value if not skipped or math.isfinite(loss_value) else math.nan)
        window_steps += 1
        window_seconds += elapsed
        done = step + 1
        last_step = done
        lr = optimizer.param_groups[0]["lr"]
        step_rate = tokens_per_step / max(elapsed, 1e-9)
        progress.step(StepStats(done, loss_value, lr, step_rate, peak_memory_bytes(device)))
        if done % run.log_every == 0 or done == run.max_steps:
            lr = optimizer.param_groups[0]["lr"]
            tokens_per_second = window_steps * tokens_per_step / max(window_seconds, 1e-9)
            peak = peak_memory_bytes(device)
            record = {
                "split": "train",
                "step": done,
                "loss": window_loss(step_losses, done, run.log_every),
                "lr": lr,
                "tokens_per_s": tokens_per_second,
                "tokens": tokens_done,
                "peak_memory_bytes": peak,
            }
            if config.optimizer.nonfinite == "skip":
                record["skipped_steps"] = skips.total
            metrics.write(record)
            progress.interval(StepStats(done, record["loss"], lr, tokens_per_second, peak))
            window_steps, window_seconds = 0, 0.0
        if run.eval_every and done % run.eval_every == 0 and done != run.max_steps:
            eval_loss = run_eval(done)
        if run.save_every and done % run.save_every == 0 and done != run.max_steps:
            checkpoint(done)

    finished_before = resume_from is not None and start_step >= run.max_steps
    earlier = [r["loss"] for r in read_metrics(output) if r["split"] == "eval" and r["step"] == last_step]
    if finished_before and earlier:  # killed after its final checkpoint, before summary.json: nothing to redo
        eval_loss = earlier[-1]
    else:
        eval_loss = run_eval(last_step)
    if run.save_final and not finished_before:
        checkpoint(last_step)
    progress.close()
    table = memory_table(model, optimizer, config.optimizer.name, dtype)
    summary = {
        "mode": mode,
        "steps": last_step,
        "skipped_steps": skips.total,
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
        "autocast": run.autocast,
    }
    # After the summary's peak is read: the export's CPU copy of the weights is not part of training.
    summary["model_folder"] = str(save_run_model(model, tokenizer, output / MODEL_FOLDER, mode=mode, dtype=dtype))
    metrics.close()
    write_json(output / SUMMARY_FILE, summary)
    plot_run_if_possible(output)  # plots/*.png when matplotlib is installed
    log(render_summary(summary))
    if run.memory_table:
        log("optimizer memory, measured after the last step, next to AdamW on the same model:\n" + table.render())
    log(f"run folder: {output.resolve()} (model in {MODEL_FOLDER}/, metrics.jsonl, summary.json, checkpoints/)")
    return summary


def window_loss(step_losses: list[float], done: int, log_every: int) -> float:
    """The mean train loss of the logging window that ends at step ``done`` (windows cut at multiples of
    ``log_every``); NaN entries (skipped steps, steps of old checkpoints) are left out, NaN if nothing is left."""
    window = [x for x in step_losses[(done - 1) // log_every * log_every : done] if not math.isnan(x)]
    return sum(window) / len(window) if window else math.nan


def resumed_schedule(
    schedule: dict[str, float], config: TrainConfig, *, step: int, saved_max: int, log: Log
) -> dict[str, float]:
    """The checkpoint's learning-rate segment, re-stretched (and said in ``log``) when ``run.max_steps`` changed."""
    max_steps = config.run.max_steps
    if max_steps == int(schedule["max_steps"]):
        return schedule
    schedule = extend_schedule(
        schedule,
        step=step,
        max_steps=max_steps,
        warmup_steps=config.schedule.warmup_steps,
        min_lr_ratio=config.schedule.min_lr_ratio,
        kind=config.schedule.kind,
    )
    lr = config.optimizer.lr
    log(
        f"resume: run.max_steps {saved_max} -> {max_steps}: the learning rate continues from "
        f"{lr * schedule['start_factor']:.3e} at step {step} and follows a cosine "
        f"down to {lr * config.schedule.min_lr_ratio:.3e} at step {max_steps}"
        if int(schedule["start_step"])
        else f"resume: run.max_steps {saved_max} -> {max_steps}: the schedule is stretched to the "
        "new max_steps (no decay had started)"
    )
    return schedule


def _interrupted(stop: StopRequest, folder: Path, step: int, output: Path, mode: str, log: Log) -> RunInterrupted:
    """Says where the checkpoint of a run stopped by a signal is and how to resume; the exception to raise."""
    message = (
        f"stopped by {stop.name} after step {step}: checkpoint {folder}. Resume with: lowrank-train {mode} "
        f"{output / CONFIG_FILE} --resume"
    )
    log(message)
    return RunInterrupted(message, int(stop.signum or 0))


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    config: TrainConfig,
    device: torch.device,
    *,
    mixed_precision: Callable[[], contextlib.AbstractContextManager],
    trainable: list[torch.nn.Parameter],
) -> tuple[float, bool]:
    """One optimizer step over ``data.grad_accum`` micro-batches (layer-wise: the updates run inside backward).

    Under ``optimizer.nonfinite: skip`` each micro-batch's loss is checked before its backward (one host
    synchronisation per micro-batch): a NaN/Inf loss skips the whole step, the micro-batches already accumulated
    included (``zero_grad`` drops them, the layer-wise engine's partial step too); the step's other batches are
    still drawn, so the data position stays ``step * grad_accum``.

    Returns:
        ``(train loss, skipped)``: the mean micro-batch loss (the first non-finite one for a skipped step) and
        whether no update was applied (a non-finite loss, or the optimizer's own skip for a NaN/Inf gradient).
    """
    data, run = config.data, config.run
    check = config.optimizer.nonfinite == "skip"
    skipped_before = getattr(optimizer, "skipped_steps", 0)
    step_loss = torch.zeros((), device=device)
    lost: float | None = None
    for _ in range(data.grad_accum):
        batch = next(batches).to(device)
        if lost is not None:
            continue
        with mixed_precision():
            if run.loss_chunk_size:
                loss = causal_lm_loss(model, batch, chunk_size=run.loss_chunk_size)
            else:
                loss = model(input_ids=batch, labels=batch).loss
        if check and not math.isfinite(value := float(loss.detach())):
            lost = value
            continue
        (loss / data.grad_accum).backward()
        step_loss += loss.detach().float() / data.grad_accum
    if lost is not None:
        optimizer.zero_grad(set_to_none=True)
        return lost, True
    if not config.optimizer.layerwise:
        if config.optimizer.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(step_loss), getattr(optimizer, "skipped_steps", 0) != skipped_before


def rescale_peak_lr(optimizer: torch.optim.Optimizer, saved_lr: float, lr: float) -> None:
    """A resume with another ``optimizer.lr``: every group's peak (``initial_lr``, restored from the checkpoint)
    is scaled by ``lr / saved_lr``, so groups with their own lr keep their ratio to it."""
    if lr == saved_lr:
        return
    for group in optimizer.param_groups:
        if "initial_lr" in group:
            group["initial_lr"] *= lr / saved_lr


def render_summary(summary: dict[str, Any]) -> str:
    """The closing lines of a run."""
    skipped = summary.get("skipped_steps", 0)
    return (
        f"done: {summary['steps']} steps{f' ({skipped} skipped: non-finite values)' if skipped else ''}, "
        f"final eval loss {summary['final_eval_loss']:.4f} "
        f"(perplexity {summary['final_eval_perplexity']:.2f}), {summary['tokens_per_s']:,.0f} tokens/s, "
        f"peak memory {format_bytes(summary['peak_memory_bytes'])} ({summary['peak_memory_kind']})"
    )
