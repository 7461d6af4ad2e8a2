"""The training loop behind ``lowrank-train pretrain`` and ``finetune``: :func:`train` runs a
:class:`TrainingRecipe` (setup, resume, one step, evaluate, checkpoint, finish: each a short method).

It only composes: the run's pieces come from :mod:`lowrank_train.train.setup` (device, data, model, optimizer
from the optimizer registry), the run folder and resume policy from :mod:`lowrank_train.train.run_dir`, held-out
evaluation from :mod:`lowrank_train.train.evaluation`. WeLore's ``compress`` command is
:mod:`lowrank_train.train.compress_run`.

A run holds its folder's lock for its whole life, stops with a checkpoint on SIGTERM / SIGINT
(:mod:`lowrank_train.train.signals`) and follows one non-finite policy (``optimizer.nonfinite``): ``raise`` stops
at the first NaN/Inf; ``skip`` skips the step in the loop and in the optimizer alike and counts it
(:class:`SkippedSteps`).

Under ``torchrun`` (``run.parallel``, :mod:`lowrank_train.train.parallel`) every rank runs the recipe on its share
of each global batch; rank 0 alone holds the lock and writes the run folder (metrics, checkpoints, summary, model).
Under FSDP2 (:mod:`lowrank_train.train.sharded`) the model is sharded before the optimizer is built, every rank
writes its shard of each checkpoint, and a resume reads any checkpoint on any number of ranks. A rank that dies
ends the others with :class:`~lowrank_train.train.parallel.RankLostError`, naming the last complete checkpoint.
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
import torch.distributed as dist

from lowrank_train.nn.chunked_loss import causal_lm_loss
from lowrank_train.train.checkpoint import read_meta
from lowrank_train.train.config import TrainConfig
from lowrank_train.train.estimate import memory_fit_problem
from lowrank_train.train.evaluation import evaluate as heldout_loss
from lowrank_train.train.evaluation import perplexity
from lowrank_train.train.export import MODEL_FOLDER, save_run_model
from lowrank_train.train.metrics import MetricsWriter, format_bytes, peak_memory_bytes, read_metrics
from lowrank_train.train.model import build_model, count_parameters
from lowrank_train.train.parallel import (
    RankLostError,
    Ranks,
    is_collective_failure,
    kill_point,
    process_group,
    rank_lost,
)
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
    resume_point,
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
from lowrank_train.train.sharded import (
    build_sharded_optimizer,
    full_model_state,
    is_sharded_checkpoint,
    restore_sharded,
    save_sharded_checkpoint,
    shard_model,
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
    with process_group(config, mode) as ranks:
        # In its own frame: the model and optimizer are unreachable when the process group is destroyed.
        return _run_recipe(config, mode, ranks, resume=resume, log=log, stop_after=stop_after)


def _run_recipe(
    config: TrainConfig, mode: str, ranks: Ranks, *, resume: bool, log: Log, stop_after: int | None
) -> dict[str, Any]:
    recipe = TrainingRecipe(
        config, mode=mode, log=log if ranks.is_main else logger.debug, stop_after=stop_after, ranks=ranks
    )
    lock = run_folder_lock(Path(config.run.output_dir)) if ranks.is_main else contextlib.nullcontext()
    with lock, stop_on_signals() as stop:
        try:
            return recipe.execute(resume=resume, stop=stop)
        except (RuntimeError, dist.DistError) as error:
            if not ranks.distributed or not is_collective_failure(error):
                raise
            raise recipe.rank_lost(error) from error


class TrainingRecipe:
    """One ``pretrain`` / ``finetune`` run as a recipe (torchtune's shape): :meth:`execute` runs :meth:`setup`,
    :meth:`resume`, :meth:`train_step` per step, :meth:`evaluate`, :meth:`save_checkpoint` and :meth:`finish`.

    ``ranks`` places it in a data-parallel run (:class:`~lowrank_train.train.parallel.Ranks`; one process by
    default): :meth:`is_main_process` writes, ``train_model`` (DDP around ``model`` when gradients need averaging)
    runs the training passes. Mode differences live in :meth:`build_model_and_optimizer`.
    """

    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    train_model: torch.nn.Module
    tokenizer: Any
    training_data: Any
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    batches: Any
    metrics: MetricsWriter
    progress: RunProgress
    output: Path
    stop: StopRequest
    num_params: int
    num_trainable: int

    def __init__(
        self, config: TrainConfig, *, mode: str, log: Log, stop_after: int | None = None, ranks: Ranks | None = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.config, self.mode, self.log, self.stop_after = config, mode, log, stop_after
        self.ranks = ranks or Ranks()
        data = config.data
        self.tokens_per_step = data.batch_size * data.seq_len * data.grad_accum * self.ranks.world_size
        self.resume_from: Path | None = None
        self.saved_meta: dict[str, Any] = {}
        self.start_step, self.tokens_done, self.train_seconds = 0, 0, 0.0
        # The train loss of every step: logging windows are cut at multiples of run.log_every from these, so a
        # resumed run logs what the uninterrupted run logs whatever log_every either used (issue 12 item 6).
        self.step_losses: list[float] = []
        self.skips = SkippedSteps(config.optimizer.max_skipped_steps, config.optimizer.max_consecutive_skips)
        self.schedule = schedule_segment(config.run.max_steps)
        self.saved: dict[int, Path] = {}  # step -> its checkpoint folder, written (or resumed from) by this run
        self.window_steps, self.window_seconds = 0, 0.0
        self.stopped_at: int | None = None

    def execute(self, *, resume: bool, stop: StopRequest) -> dict[str, Any]:
        """The whole run inside the run lock, ``stop`` set by the signal handlers; returns :func:`train`'s result."""
        self.stop = stop
        finished = self.prepare(resume)
        if finished is not None:
            return finished
        self.setup()
        if self.resume_from is not None:
            self.resume(self.resume_from)
        self.open_metrics()
        if self.resume_from is None:
            self.evaluate(0)
        # A bar in a terminal, plain lines elsewhere; messages while the bar is drawn go above it.
        self.progress = RunProgress(
            total=self.config.run.max_steps,
            start=self.start_step,
            log=self.log,
            interactive=None if self.is_main_process() else False,
        )
        self.log = self.progress.wrap(self.log)
        last_step = self.train_steps()
        if last_step is None:
            return {"stopped_at": self.stopped_at}
        return self.finish(last_step)

    def is_main_process(self) -> bool:
        """Whether this process writes the run folder (rank 0; always, in a single process)."""
        return self.ranks.is_main

    def prepare(self, resume: bool) -> dict[str, Any] | None:
        """Device, threads, memory check and run folder; the saved summary when the run is already complete."""
        run = self.config.run
        self.device = self.ranks.device(resolve_device(run.device))
        self.dtype = resolve_dtype(run.dtype)
        if run.num_threads is not None:
            torch.set_num_threads(run.num_threads)
        if run.check_memory:
            problem = memory_fit_problem(self.config, self.device)
            if problem:
                raise MemoryError(f"{problem} (set run.check_memory=false to try anyway)")
        prepared, error = None, None
        if self.is_main_process():
            try:
                prepared = self.prepare_run_folder(resume)
            except Exception as caught:
                error = caught
        # Rank 0 decides; the others follow it, or stop with its message.
        message = self.ranks.broadcast(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise ValueError(f"rank 0 stopped the run: {message}")
        self.output, self.resume_from, finished = self.ranks.broadcast(prepared)
        self.saved_meta = read_meta(self.resume_from) if self.resume_from is not None else {}
        return finished

    def prepare_run_folder(self, resume: bool) -> tuple[Path, Path | None, dict[str, Any] | None]:
        """The run folder checked and ``config.yaml`` written; ``(folder, checkpoint to resume, saved summary)``."""
        run = self.config.run
        output, resume_from = prepare_output_dir(self.config, resume, log=self.log, world_size=self.ranks.world_size)
        meta = read_meta(resume_from) if resume_from is not None else {}
        summary_file = output / SUMMARY_FILE
        if resume_from is not None and int(meta["step"]) >= run.max_steps and summary_file.is_file():
            # Issue 15 item 4: a finished run resumed with the same max_steps changes nothing and appends nothing.
            self.log(
                f"the run in {output} is already complete at step {meta['step']} "
                f"(run.max_steps={run.max_steps}); nothing to do. Pass a larger run.max_steps to continue it"
            )
            return output, resume_from, json.loads(summary_file.read_text(encoding="utf-8"))
        self.log(f"run folder: {output.resolve()}")
        return output, resume_from, None

    def setup(self) -> None:
        """Seeds the run, builds the model, tokenizer, data and optimizer, and opens the batch stream."""
        torch.manual_seed(self.config.run.seed)
        self.build_model_and_optimizer()
        self.batches = self.ranks.share(self.training_data.train_batches())

    def build_model_and_optimizer(self) -> None:
        """The model on its device, its tokenizer and data, and the optimizer over the mode's parameter groups."""
        config, run = self.config, self.config.run
        model, model_tokenizer = build_model(
            config.model,
            self.dtype,
            weight_bits=config.optimizer.resolved_weight_bits if self.mode == "pretrain" else None,
            weight_group_size=config.optimizer.weight_group_size,
            seed=run.seed,
        )
        vocab_size = model.get_input_embeddings().num_embeddings
        with self.ranks.main_first():  # rank 0 fills the caches
            self.tokenizer = load_run_tokenizer(config.data.tokenizer, model_tokenizer)
            self.training_data = open_run_data(config, self.tokenizer, vocab_size, world_size=self.ranks.world_size)
        self.check_data_fingerprint()
        self.model = prepare_model(model, config, self.device)
        if self.ranks.sharded:  # before the groups are made: fully_shard replaces the parameters with DTensors
            shard_model(self.model)
        if self.mode == "finetune":
            groups = finetune_param_groups(self.model, config)
        else:
            groups = pretrain_param_groups(self.model, config.optimizer)
        build = build_sharded_optimizer if self.ranks.sharded else build_optimizer
        self.optimizer = build(groups, config)
        self.trainable = [p for g in groups for p in g["params"]]
        self.train_model = self.ranks.wrap(self.model, layerwise=config.optimizer.layerwise)

    def check_data_fingerprint(self) -> None:
        """Refuses to resume on changed data unless ``run.allow_data_change`` (then says so)."""
        fingerprint = self.training_data.fingerprint
        if self.resume_from is None or self.saved_meta.get("data_fingerprint", fingerprint) == fingerprint:
            return
        if not self.config.run.allow_data_change:
            raise ResumeError(
                f"--resume: the data changed since the checkpoint in {self.resume_from} (the text of data.corpus="
                f"{self.config.data.corpus!r}, the tokenizer or data.seq_len: fingerprint "
                f"{self.saved_meta['data_fingerprint'][:12]}, now {fingerprint[:12]}). Restore the data, "
                "or pass run.allow_data_change=true to continue on the new data"
            )
        self.log("resume: the data changed since the checkpoint; continuing on the new data (run.allow_data_change)")

    def resume(self, folder: Path) -> None:
        """Restores model, optimizer, RNG, data position, counters and schedule from the checkpoint ``folder``."""
        config, saved_meta = self.config, self.saved_meta
        if self.ranks.sharded or is_sharded_checkpoint(saved_meta):  # any layout, any number of ranks
            point = resume_point(
                restore_sharded(folder, saved_meta, self.model, self.optimizer, self.device, self.ranks)
            )
        else:
            point = restore_checkpoint(folder, self.model, self.optimizer, self.device)
        step = self.start_step = point.step
        self.tokens_done, self.train_seconds = point.tokens, point.train_seconds
        # Checkpoints written before the losses were stored: unknown steps are NaN, left out of their window.
        self.step_losses = (point.step_losses + [math.nan] * step)[:step]
        if point.data is not None and saved_meta.get("data_fingerprint") == self.training_data.fingerprint:
            self.batches.load_state_dict(point.data)
        else:  # older checkpoints, or new data (run.allow_data_change): the same position, counted in batches
            self.batches = self.ranks.share(self.training_data.train_batches(step * config.data.grad_accum))
        saved_max = int(saved_meta["config"]["run"]["max_steps"])
        schedule = point.schedule or schedule_segment(saved_max)
        self.skips.total, self.skips.consecutive = point.skipped_steps, point.consecutive_skips
        rescale_peak_lr(self.optimizer, float(saved_meta["config"]["optimizer"]["lr"]), config.optimizer.lr)
        self.log(f"resumed from {folder} at step {step}")
        self.schedule = resumed_schedule(schedule, config, step=step, saved_max=saved_max, log=self.log)
        self.saved[step] = folder

    def open_metrics(self) -> None:
        """Opens ``metrics.jsonl`` (continued on a resume) and logs what runs."""
        config, run = self.config, self.config.run
        if not self.is_main_process():
            self.metrics = NoMetrics()  # type: ignore[assignment]
        else:
            self.metrics = MetricsWriter(
                self.output,
                run.metrics,
                resume_step=self.start_step if self.resume_from is not None else None,
                log=self.log,
                run_name=self.output.name,
                config=config.to_dict(),
            )
        self.num_params = count_parameters(self.model)
        self.num_trainable = sum(p.numel() for p in self.trainable)
        if self.ranks.distributed or self.ranks.sharded:
            self.log(f"engine: {self.ranks.engine} on {self.ranks.world_size} processes ({self.ranks.reason})")
        self.log(
            f"{self.mode}: {type(self.model).__name__} with {self.num_params / 1e6:.2f}M parameters "
            f"({self.num_trainable / 1e6:.2f}M trainable), optimizer {config.optimizer.name}"
            f"{' (layer-wise)' if config.optimizer.layerwise else ''}, {run.dtype} on {self.device}; "
            f"{self.training_data.describe()}, {self.tokens_per_step} tokens per step"
        )

    def mixed_precision(self) -> contextlib.AbstractContextManager:
        """Autocast to ``run.autocast`` for forward passes (backward follows its dtypes); a no-op when unset."""
        if self.config.run.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.config.run.autocast))

    def train_steps(self) -> int | None:
        """Steps from the start step to ``run.max_steps``; the last step done, or ``None`` at ``stop_after``."""
        run = self.config.run
        last_step = self.start_step
        for step in range(self.start_step, run.max_steps):
            if self.stop_after is not None and step >= self.stop_after:
                self.close()
                self.stopped_at = step
                return None
            if self.ranks.any(self.stop.signum is not None, self.device):  # every rank stops at the same step
                self.close()
                # a signal during a scheduled save (or before the first step of a resume): that checkpoint is the one
                folder = self.saved.get(step) or self.save_checkpoint(step)
                raise _interrupted(self.stop, folder, step, self.output, self.mode, self.log)
            loss, elapsed = self.train_step(step)
            last_step = done = step + 1
            self.log_step(done, loss, elapsed)
            if run.eval_every and done % run.eval_every == 0 and done != run.max_steps:
                self.evaluate(done)
            if run.save_every and done % run.save_every == 0 and done != run.max_steps:
                self.save_checkpoint(done)
        return last_step

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (0-based ``step``) under the non-finite policy; its loss and seconds."""
        kill_point(self.ranks.rank, step + 1)
        schedule = self.config.schedule
        set_learning_rate(
            self.optimizer,
            segment_lr_factor(
                step,
                segment=self.schedule,
                warmup_steps=schedule.warmup_steps,
                min_lr_ratio=schedule.min_lr_ratio,
                kind=schedule.kind,
            ),
        )
        started = time.perf_counter()
        loss, skipped = optimizer_step(
            self.train_model,
            self.optimizer,
            self.batches,
            self.config,
            self.device,
            mixed_precision=self.mixed_precision,
            trainable=self.trainable,
            ranks=self.ranks,
        )
        elapsed = time.perf_counter() - started
        if not math.isfinite(loss) and self.config.optimizer.nonfinite == "raise":
            raise FloatingPointError(
                f"the training loss became {loss} at step {step + 1}; lower optimizer.lr or add warm-up "
                "(schedule.warmup_steps), or set optimizer.nonfinite=skip to skip such steps"
            )
        self.skips.record(step + 1, skipped, loss, self.log)
        self.tokens_done += self.tokens_per_step  # a skipped step consumed its batches too
        self.train_seconds += elapsed
        self.step_losses.append(loss if not skipped or math.isfinite(loss) else math.nan)
        return loss, elapsed

    def log_step(self, done: int, loss: float, elapsed: float) -> None:
        """Advances the progress bar; at the end of a logging window, writes its train record."""
        run = self.config.run
        self.window_steps += 1
        self.window_seconds += elapsed
        lr = self.optimizer.param_groups[0]["lr"]
        step_rate = self.tokens_per_step / max(elapsed, 1e-9)
        self.progress.step(StepStats(done, loss, lr, step_rate, peak_memory_bytes(self.device)))
        if done % run.log_every != 0 and done != run.max_steps:
            return
        tokens_per_second = self.window_steps * self.tokens_per_step / max(self.window_seconds, 1e-9)
        peak = peak_memory_bytes(self.device)
        record = {
            "split": "train",
            "step": done,
            "loss": window_loss(self.step_losses, done, run.log_every),
            "lr": lr,
            "tokens_per_s": tokens_per_second,
            "tokens": self.tokens_done,
            "peak_memory_bytes": peak,
        }
        if self.config.optimizer.nonfinite == "skip":
            record["skipped_steps"] = self.skips.total
        self.metrics.write(record)
        self.progress.interval(StepStats(done, record["loss"], lr, tokens_per_second, peak))
        self.window_steps, self.window_seconds = 0, 0.0

    def evaluate(self, step: int) -> float:
        """The held-out loss after ``step`` steps, written to the metrics and logged."""
        with self.mixed_precision():
            loss = heldout_loss(
                self.model,
                self.training_data.heldout,
                self.config.data.batch_size * self.ranks.world_size,  # the global batches, each rank its rows
                self.config.run.eval_batches,
                self.device,
                rank=self.ranks.rank,
                world_size=self.ranks.world_size,
                all_sum=self.ranks.sum,
            )
        self.metrics.write({"split": "eval", "step": step, "loss": loss, "perplexity": perplexity(loss)})
        self.log(f"eval step {step}: loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
        return loss

    def save_checkpoint(self, step: int) -> Path:
        """Writes the checkpoint after ``step`` steps (one atomic commit) and returns its folder.

        Data-parallel, rank 0 writes its state (the replicas are identical) and the others wait for it; under
        FSDP2 every rank writes its shard (:func:`~lowrank_train.train.sharded.save_sharded_checkpoint`).
        """
        if self.ranks.sharded:
            self.saved[step] = save_sharded_checkpoint(
                self.output,
                self.config,
                self.mode,
                self.model,
                self.optimizer,
                self.device,
                self.ranks,
                self.resume_state(step, with_model=False),
                data_fingerprint=self.training_data.fingerprint,
            )
            return self.saved[step]
        if self.is_main_process():
            self.write_checkpoint(step)
        self.saved[step] = self.ranks.broadcast(self.saved.get(step))
        return self.saved[step]

    def write_checkpoint(self, step: int) -> None:
        """Writes this process's checkpoint after ``step`` steps into ``self.saved[step]``."""
        state = self.resume_state(step, with_model=True)
        fingerprint = self.training_data.fingerprint
        self.saved[step] = save_run_checkpoint(
            self.output,
            self.config,
            self.mode,
            state,
            data_fingerprint=fingerprint,
            world_size=self.ranks.world_size,
        )

    def resume_state(self, step: int, *, with_model: bool) -> dict[str, Any]:
        """What ``state.pt`` holds after ``step`` steps; model, optimizer and RNG only ``with_model``."""
        return checkpoint_state(
            self.model if with_model else None,
            self.optimizer if with_model else None,
            self.device,
            step=step,
            tokens=self.tokens_done,
            train_seconds=self.train_seconds,
            data=self.batches.state_dict(),
            step_losses=self.step_losses,
            schedule=self.schedule,
            skipped_steps=self.skips.total,
            consecutive_skips=self.skips.consecutive,
        )

    def rank_lost(self, error: BaseException) -> RankLostError:
        """What a surviving rank says when another one is gone: the last complete checkpoint and how to resume."""
        done = [step for step, folder in self.saved.items() if folder is not None]
        checkpoint = str(self.saved[max(done)]) if done else None
        config_file = Path(self.config.run.output_dir) / CONFIG_FILE
        resume = (
            f"torchrun --nproc_per_node {self.ranks.world_size} -m lowrank_train {self.mode} {config_file} --resume"
        )
        return rank_lost(error, self.ranks, checkpoint, resume)

    def close(self) -> None:
        """Closes the progress bar and the metrics file."""
        self.progress.close()
        self.metrics.close()

    def finish(self, last_step: int) -> dict[str, Any]:
        """Final eval and checkpoint, then the summary, the exported model and the plots; returns the summary."""
        run, output = self.config.run, self.output
        finished_before = self.resume_from is not None and self.start_step >= run.max_steps
        earlier = self.ranks.broadcast(
            [r["loss"] for r in read_metrics(output) if r["split"] == "eval" and r["step"] == last_step]
            if finished_before and self.is_main_process()
            else []
        )
        if finished_before and earlier:  # killed after its final checkpoint, before summary.json: nothing to redo
            eval_loss = earlier[-1]
        else:
            eval_loss = self.evaluate(last_step)
        self.ranks.check_replicas(self.model)  # every rank holds the same weights (INT codes included)
        if run.save_final and not finished_before:
            self.save_checkpoint(last_step)
        self.progress.close()
        table = memory_table(self.model, self.optimizer, self.config.optimizer.name, self.dtype)
        summary = self.summary(last_step, eval_loss, table.to_dict())
        self.metrics.close()
        # FSDP2: every rank sends its shards; rank 0 writes the whole model.
        full_state = full_model_state(self.model) if self.ranks.sharded else None
        if self.is_main_process():
            # After the summary's peak is read: the export's CPU copy of the weights is not part of training.
            model_folder = save_run_model(
                self.model, self.tokenizer, output / MODEL_FOLDER, mode=self.mode, dtype=self.dtype, state=full_state
            )
            summary["model_folder"] = str(model_folder)
            write_json(output / SUMMARY_FILE, summary)
            plot_run_if_possible(output)  # plots/*.png when matplotlib is installed
        summary["model_folder"] = self.ranks.broadcast(summary.get("model_folder"))  # the others wait for rank 0
        self.log(render_summary(summary))
        if run.memory_table:
            self.log(
                "optimizer memory, measured after the last step, next to AdamW on the same model:\n" + table.render()
            )
        self.log(
            f"run folder: {output.resolve()} (model in {MODEL_FOLDER}/, metrics.jsonl, summary.json, checkpoints/)"
        )
        return summary

    def summary(self, last_step: int, eval_loss: float, memory_table: dict[str, Any]) -> dict[str, Any]:
        """The run's summary record (``summary.json``) after ``last_step`` steps, without the model folder."""
        device = self.device
        return {
            "mode": self.mode,
            "steps": last_step,
            "skipped_steps": self.skips.total,
            "final_eval_loss": eval_loss,
            "final_eval_perplexity": perplexity(eval_loss),
            "tokens": self.tokens_done,
            "train_seconds": self.train_seconds,
            "tokens_per_s": self.tokens_done / self.train_seconds if self.train_seconds else 0.0,
            "peak_memory_bytes": peak_memory_bytes(device),
            "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "parameters": self.num_params,
            "trainable_parameters": self.num_trainable,
            "optimizer_state_bytes": optimizer_state_bytes(self.optimizer),
            "memory_table": memory_table,
            "device": str(device),
            "autocast": self.config.run.autocast,
        }


class NoMetrics:
    """The metrics sink of a rank that writes nothing (data-parallel ranks other than 0)."""

    def write(self, record: dict[str, Any]) -> None:
        """Drops ``record``."""

    def close(self) -> None:
        """Nothing to close."""


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
    ranks: Ranks | None = None,
) -> tuple[float, bool]:
    """One optimizer step over ``data.grad_accum`` micro-batches (layer-wise: the updates run inside backward).

    Under ``optimizer.nonfinite: skip`` each micro-batch's loss is checked before its backward (one host
    synchronisation per micro-batch): a NaN/Inf loss skips the whole step, the micro-batches already accumulated
    included (``zero_grad`` drops them, the layer-wise engine's partial step too); the step's other batches are
    still drawn, so the data position stays ``step * grad_accum``.

    Data-parallel (``ranks``), the loss is averaged over the ranks (the checked loss too, so all ranks skip alike),
    and a DDP ``model`` all-reduces gradients only in the last micro-batch's backward (``no_sync`` before it).

    Returns:
        ``(train loss, skipped)``: the mean micro-batch loss (the first non-finite one for a skipped step) and
        whether no update was applied (a non-finite loss, or the optimizer's own skip for a NaN/Inf gradient).
    """
    data, run = config.data, config.run
    ranks = ranks or Ranks()
    check = config.optimizer.nonfinite == "skip"
    skipped_before = getattr(optimizer, "skipped_steps", 0)
    step_loss = torch.zeros((), device=device)
    lost: float | None = None
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for index in range(data.grad_accum):
        batch = next(batches).to(device)
        if lost is not None:
            continue
        with no_sync() if index < data.grad_accum - 1 else contextlib.nullcontext():
            with mixed_precision():
                if run.loss_chunk_size:
                    loss = causal_lm_loss(model, batch, chunk_size=run.loss_chunk_size)
                else:
                    loss = model(input_ids=batch, labels=batch).loss
            if check and not math.isfinite(value := float(ranks.mean(loss.detach()))):
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
    return float(ranks.mean(step_loss)), getattr(optimizer, "skipped_steps", 0) != skipped_before


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
